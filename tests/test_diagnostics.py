"""amax_gain and the composite products on matrices with known gains and products."""

import jax.numpy as jnp
import numpy as np

from mhc_jax import amax_gain, composite_backward, composite_forward, layer_diagnostics


def test_known_gains():
  perm = jnp.eye(4)[jnp.array([2, 0, 3, 1])]
  assert [float(g) for g in amax_gain(perm)] == [1.0, 1.0]
  assert [float(g) for g in amax_gain(3.0 * perm)] == [3.0, 3.0]
  m = jnp.array([[1.0, -3.0], [2.0, 0.0]])  # row sums -2, 2; column sums 3, -3
  assert [float(g) for g in amax_gain(m)] == [2.0, 3.0]
  skew = jnp.array([[1.0, 1.0], [0.0, 0.0]])  # rows 2, 0: forward 2; columns 1, 1: backward 1
  assert [float(g) for g in amax_gain(skew)] == [2.0, 1.0]
  batched = jnp.stack([perm, 2 * perm])
  np.testing.assert_array_equal(amax_gain(batched)[0], [1.0, 2.0])


def test_composites_multiply_in_layer_order():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(5, 3, 3)).astype(np.float32)
  fwd, bwd = composite_forward(jnp.asarray(h)), composite_backward(jnp.asarray(h))
  for l in range(5):
    want_f = np.eye(3)
    for k in range(l + 1):
      want_f = h[k] @ want_f  # H_l ... H_1
    want_b = np.eye(3)
    for k in range(l, 5):
      want_b = h[k] @ want_b  # H_L ... H_l: later layers on the left
    np.testing.assert_allclose(fwd[l], want_f, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bwd[l], want_b, rtol=1e-4, atol=1e-5)


def test_layer_diagnostics_of_scaled_identities():
  # Layer l is (l + 1) * I for every token: single gain l + 1, composite gain (l + 1)!.
  h = jnp.stack([(l + 1.0) * jnp.broadcast_to(jnp.eye(2), (3, 4, 2, 2)) for l in range(3)])
  d = layer_diagnostics(h)
  np.testing.assert_allclose(d["single_fwd_avg"], [1, 2, 3])
  np.testing.assert_allclose(d["composite_fwd_avg"], [1, 2, 6])
  np.testing.assert_allclose(d["composite_bwd_tok"], [6, 6, 3])
  np.testing.assert_allclose(d["marginal_err"], [0, 1, 2])
  np.testing.assert_allclose(d["composite_min_col_sum"], [1, 2, 6])
