"""mhc_coefficients against the float64 spec: values, parameter layout, gradients, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import mhc_coefficients, num_logits
from tests.reference_np import coefficients_np, numerical_vjp


def _inputs(n, c, lead=(2, 3), seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(*lead, n, c)).astype(np.float32)
  phi = (scale * rng.normal(size=(n * c, num_logits(n))) / np.sqrt(n * c)).astype(np.float32)
  alpha = np.array([0.7, 1.3, 2.0], np.float32)
  bias = (0.3 * rng.normal(size=num_logits(n))).astype(np.float32)
  return x, phi, alpha, bias


@pytest.mark.parametrize("n,c", [(1, 8), (2, 16), (4, 32), (8, 8)])
def test_matches_float64_spec(n, c):
  args = _inputs(n, c)
  got = mhc_coefficients(*map(jnp.asarray, args))
  want = coefficients_np(*args)
  for g, w, shape in zip(got, want, [(2, 3, n), (2, 3, n), (2, 3, n, n)]):
    assert g.shape == shape and g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, atol=3e-6, rtol=1e-5)


@pytest.mark.parametrize("column,moved", [(1, "pre"), (4 + 2, "post"), (8 + 1 * 4 + 3, "res")])
def test_one_phi_column_moves_exactly_its_coefficient(column, moved):
  n, c = 4, 8
  x = jnp.asarray(np.random.default_rng(0).normal(size=(n, c)), jnp.float32)
  phi = jnp.zeros((n * c, num_logits(n))).at[:, column].set(1.0)
  h_pre, h_post, h_res = mhc_coefficients(x, phi, jnp.ones(3), jnp.zeros(num_logits(n)))
  base_pre, base_post, base_res = mhc_coefficients(
      x, jnp.zeros_like(phi), jnp.ones(3), jnp.zeros(num_logits(n)))
  changed = {"pre": np.flatnonzero(np.abs(h_pre - base_pre) > 1e-4),
             "post": np.flatnonzero(np.abs(h_post - base_post) > 1e-4)}
  if moved == "pre":
    assert changed["pre"].tolist() == [1] and changed["post"].size == 0
    np.testing.assert_allclose(h_res, base_res, atol=1e-6)
  elif moved == "post":
    assert changed["post"].tolist() == [2] and changed["pre"].size == 0
    np.testing.assert_allclose(h_res, base_res, atol=1e-6)
  else:  # logit 2n + i*n + j with i = 1, j = 3: H_res[1, 3] (row-major, paper orientation)
    assert changed["pre"].size == 0 and changed["post"].size == 0
    delta = np.asarray(h_res - base_res)
    sign = np.sign(float(jnp.sum(x.reshape(-1))))  # the logit is +-|v@phi|, sign of sum(v)
    assert np.unravel_index(np.argmax(sign * delta), delta.shape) == (1, 3)


def test_alpha_scales_its_own_block_only():
  x, phi, _, bias = _inputs(4, 8)
  zero = np.zeros(num_logits(4), np.float32)
  for k, name in enumerate(["pre", "post", "res"]):
    alpha = np.zeros(3, np.float32)
    alpha[k] = 1.0
    got = mhc_coefficients(x, phi, alpha, zero)
    flat = mhc_coefficients(x, phi, np.zeros(3, np.float32), zero)
    moved = [float(jnp.max(jnp.abs(a - b))) > 1e-4 for a, b in zip(got, flat)]
    assert moved == [i == k for i in range(3)], name


@pytest.mark.parametrize("argnum", [0, 1, 2, 3])
def test_gradients_match_float64_finite_differences(argnum):
  args = _inputs(2, 3, lead=(2,), seed=1, scale=3.0)
  rng = np.random.default_rng(7)
  cts = [rng.normal(size=s) for s in [(2, 2), (2, 2), (2, 2, 2)]]
  f32 = lambda *a: mhc_coefficients(*a)
  _, vjp = jax.vjp(f32, *map(jnp.asarray, args))
  got = vjp(tuple(jnp.asarray(ct, jnp.float32) for ct in cts))[argnum]
  flat_ct = np.concatenate([ct.reshape(-1) for ct in cts])
  flat_f = lambda *a: np.concatenate([o.reshape(-1) for o in coefficients_np(*a)])
  want = numerical_vjp(flat_f, args, flat_ct, argnum)
  np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=1e-3)


def test_bfloat16_streams_give_float32_coefficients():
  x, phi, alpha, bias = _inputs(4, 16)
  got = mhc_coefficients(jnp.asarray(x, jnp.bfloat16), phi, alpha, bias)
  want = coefficients_np(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), phi, alpha, bias)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_bad_shapes_name_the_argument():
  x, phi, alpha, bias = _inputs(4, 8)
  with pytest.raises(ValueError, match="phi has shape"):
    mhc_coefficients(x, phi[:, :-1], alpha, bias)
  with pytest.raises(ValueError, match="alpha"):
    mhc_coefficients(x, phi, alpha[:2], bias)
  with pytest.raises(ValueError, match="bias"):
    mhc_coefficients(x, phi, alpha, bias[:-1])
  with pytest.raises(ValueError, match="impl"):
    mhc_coefficients(x, phi, alpha, bias, impl="cuda")
