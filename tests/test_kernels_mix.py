"""`pre_mix` and fused `post_res_mix` kernels vs `mhc_jax.streams` (XLA): forward and VJP."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from kernels_pallas import common
import kernels_pallas
from mhc_jax.core import streams


def _inputs(n, c, tokens, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (2, tokens // 2, n, c)).astype(dtype)
  y = jax.random.normal(ks[1], (2, tokens // 2, c)).astype(dtype)
  h_post = 2.0 * jax.random.uniform(ks[2], (2, tokens // 2, n))
  h_res = jax.nn.softmax(3.0 * jax.random.normal(ks[3], (2, tokens // 2, n, n)), axis=-1)
  return x, y, h_post, h_res


def _tol(want, dtype):
  """f32: a few ulps of the largest value; bf16: one bf16 ulp of it (<= 2**-7 of it)."""
  eps = 2.0 ** -7 if dtype == jnp.bfloat16 else 4 * 2.0 ** -23
  return eps * float(jnp.max(jnp.abs(want.astype(jnp.float32))))


def _check(test, got, want, dtype):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    chex.assert_equal(g.dtype, w.dtype)
    chex.assert_trees_all_close(g.astype(jnp.float32), w.astype(jnp.float32),
                                atol=_tol(w, g.dtype), rtol=0)


# mix_c=128 with C=256 gives two feature blocks, so partial d(h) sums are exercised.
CASES = [dict(n=n, dtype=d, tokens=t) for n, d, t in (
    (2, jnp.float32, 64), (4, jnp.float32, 200), (4, jnp.bfloat16, 64), (8, jnp.bfloat16, 200),
    (8, jnp.float32, 64))]


class MixTest(parameterized.TestCase):
  INTERPRET = None

  def _bs(self):
    return common.BlockSizes(mix_tokens=32, mix_c=128, interpret=self.INTERPRET)

  @parameterized.parameters(*CASES)
  def test_pre_mix(self, n, dtype, tokens):
    x, _, h, _ = _inputs(n, 256, tokens, dtype)
    h = h / 2.0
    _check(self, kernels_pallas.pre_mix(x, h, block_sizes=self._bs()), streams.pre_mix(x, h), dtype)
    ct = jax.random.normal(jax.random.key(9), x.shape[:-2] + x.shape[-1:]).astype(dtype)
    _, vjp_k = jax.vjp(lambda *a: kernels_pallas.pre_mix(*a, block_sizes=self._bs()), x, h)
    _, vjp_r = jax.vjp(streams.pre_mix, x, h)
    _check(self, vjp_k(ct), vjp_r(ct), dtype)

  @parameterized.parameters(*CASES)
  def test_post_res_mix(self, n, dtype, tokens):
    args = _inputs(n, 256, tokens, dtype, seed=1)
    _check(self, kernels_pallas.post_res_mix(*args, block_sizes=self._bs()),
           streams.post_res_mix(*args), dtype)
    ct = jax.random.normal(jax.random.key(8), args[0].shape).astype(dtype)
    _, vjp_k = jax.vjp(lambda *a: kernels_pallas.post_res_mix(*a, block_sizes=self._bs()), *args)
    _, vjp_r = jax.vjp(streams.post_res_mix, *args)
    _check(self, vjp_k(ct), vjp_r(ct), dtype)

  def test_default_blocks_and_float64_grads(self):
    """Default block sizes; f32 kernel gradients vs a float64 numpy evaluation."""
    x, y, h_post, h_res = _inputs(4, 128, 16, jnp.float32, seed=2)
    loss = lambda *a: jnp.sum(jnp.cos(jnp.arange(128.0)) * kernels_pallas.post_res_mix(*a))
    got = jax.grad(loss, argnums=(0, 1, 2, 3))(x, y, h_post, h_res)
    w = np.cos(np.arange(128.0))
    xd, yd = np.asarray(x, np.float64), np.asarray(y, np.float64)
    want = (np.einsum("tsij,c->tsjc", np.asarray(h_res, np.float64), w) + 0 * xd,
            np.einsum("tsi,c->tsc", np.asarray(h_post, np.float64), w),
            np.einsum("tsc,c->ts", yd, w)[..., None].repeat(4, -1),
            np.einsum("tsjc,c->tsj", xd, w)[..., None, :].repeat(4, -2))
    for g, r in zip(got, want):
      np.testing.assert_allclose(g, r, atol=1e-5 * np.max(np.abs(r)), rtol=0)

  def test_token_rows_equal_the_stream_axis(self):
    """Streams as token rows `(..., n*C)` (how the model carries them): the same values and
    gradients as `(..., n, C)`, in the shape they came in."""
    x, y, h_post, h_res = _inputs(4, 256, 64, jnp.bfloat16, seed=3)
    rows = x.reshape(*x.shape[:-2], -1)
    f = lambda x, rows=False: kernels_pallas.post_res_mix(x, y, h_post, h_res, token_rows=rows,
                                                         block_sizes=self._bs())
    chex.assert_trees_all_equal(f(rows, True), f(x).reshape(rows.shape))
    chex.assert_trees_all_equal(
        kernels_pallas.pre_mix(rows, h_post, token_rows=True, block_sizes=self._bs()),
        kernels_pallas.pre_mix(x, h_post, block_sizes=self._bs()))
    loss = lambda x, rows=False: jnp.sum(jnp.sin(f(x, rows).astype(jnp.float32)))
    chex.assert_trees_all_equal(jax.grad(loss)(rows, True), jax.grad(loss)(x).reshape(rows.shape))
    with self.assertRaisesRegex(ValueError, "token rows must have shape"):
      kernels_pallas.pre_mix(rows[..., :-1], h_post, token_rows=True)
    with self.assertRaisesRegex(ValueError, "need token_rows=True"):  # no guessing the layout
      kernels_pallas.pre_mix(rows, h_post)

  def test_rejects_bad_shapes(self):
    x, y, h_post, h_res = _inputs(4, 128, 16, jnp.float32)
    with self.assertRaisesRegex(ValueError, "C=100 is not a positive multiple of 128"):
      kernels_pallas.pre_mix(jnp.zeros((2, 8, 4, 100)), h_post)
    with self.assertRaisesRegex(ValueError, "h_res has shape"):
      kernels_pallas.post_res_mix(x, y, h_post, h_res[..., :2])


class MixInterpretTest(MixTest):
  INTERPRET = True

  def setUp(self):
    super().setUp()
    if jax.default_backend() == "cpu":
      self.skipTest("on CPU the auto path of MixTest already runs in interpret mode")


if __name__ == "__main__":
  absltest.main()
