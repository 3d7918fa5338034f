"""Grouped matmul: ragged_dot and the megablox kernels (interpreted) against a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from mhc_jax.model.grouped_matmul import grouped_matmul

K, N, G = 256, 384, 4


def _reference(x_AxK, w_GxKxN, sizes_G):
  """float64 numpy: each row times its group's matrix; rows past the last group are zeros."""
  x, w = np.asarray(x_AxK, np.float64), np.asarray(w_GxKxN, np.float64)
  group_A = np.searchsorted(np.cumsum(sizes_G), np.arange(x.shape[0]), side="right")
  y = np.zeros((x.shape[0], w.shape[2]))
  for row, g in enumerate(group_A):
    if g < w.shape[0]:
      y[row] = x[row] @ w[g]
  return y


def _reference_vjp(x_AxK, w_GxKxN, sizes_G, ct_AxN):
  """float64 numpy gradients of `sum(ct * y)` with respect to x and w."""
  x, w, ct = (np.asarray(a, np.float64) for a in (x_AxK, w_GxKxN, ct_AxN))
  group_A = np.searchsorted(np.cumsum(sizes_G), np.arange(x.shape[0]), side="right")
  dx, dw = np.zeros_like(x), np.zeros_like(w)
  for row, g in enumerate(group_A):
    if g < w.shape[0]:
      dx[row] = w[g] @ ct[row]
      dw[g] += np.outer(x[row], ct[row])
  return dx, dw


def _inputs(rows):
  keys = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(keys[0], (rows, K)), jax.random.normal(keys[1], (G, K, N)) / 16,
          jax.random.normal(keys[2], (rows, N)))


class GroupedMatmulTest(parameterized.TestCase):

  @parameterized.product(
      impl=("ragged_dot", "megablox"),
      # An empty group; rows past the last group (the expert-parallel receive buffer's spare
      # slots); a row count that is not a multiple of the megablox row tile.
      sizes=((50, 0, 70, 40), (64, 64, 64, 64), (0, 0, 0, 203)))
  def test_matches_float64_reference(self, impl, sizes):
    rows = 203 if sum(sizes) == 203 else 256
    x, w, ct = _inputs(rows)
    sizes_G = jnp.array(sizes, jnp.int32)
    f = lambda x, w: grouped_matmul(x, w, sizes_G, impl=impl, interpret=True)
    y, vjp = jax.vjp(f, x, w)
    np.testing.assert_allclose(y, _reference(x, w, sizes), rtol=2e-5, atol=2e-5)
    self.assertEqual(float(jnp.abs(y[sum(sizes):]).max(initial=0.0)), 0.0)
    dx, dw = vjp(ct)
    ref_dx, ref_dw = _reference_vjp(x, w, sizes, ct)
    np.testing.assert_allclose(dx, ref_dx, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=2e-5, atol=1e-4)

  def test_megablox_bfloat16_matches_ragged_dot(self):
    x, w, ct = (a.astype(jnp.bfloat16) for a in _inputs(256))
    sizes_G = jnp.array([100, 28, 0, 128], jnp.int32)
    out = {}
    for impl in ("ragged_dot", "megablox"):
      f = lambda x, w, impl=impl: grouped_matmul(x, w, sizes_G, impl=impl, interpret=True)
      y, vjp = jax.vjp(f, x, w)
      out[impl] = (y, *vjp(ct))
    for a, b in zip(out["ragged_dot"], out["megablox"]):
      self.assertEqual(a.dtype, jnp.bfloat16)
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=2e-2, atol=2e-2)


if __name__ == "__main__":
  absltest.main()
