"""Fused coefficient kernel vs `mhc_jax`'s XLA path: forward, VJP, float64 gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from kernels_pallas import common
from kernels_pallas import sinkhorn as kernel_sinkhorn
import kernels_pallas
from mhc_jax.core import sinkhorn
from mhc_jax.core import coefficients as xla_coefficients

KW = dict(num_iters=20, eps=1e-6, post_scale=2.0)
F32_ATOL = 2e-6  # coefficients are O(1); this is a few float32 ulps.


def _inputs(n, c, tokens, dtype, scale, seed=0):
  """Streams `(2, tokens/2, n, c)`; logits of size ~scale (flat: 0.01, sharp: 30)."""
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (2, tokens // 2, n, c)).astype(dtype)
  phi = jax.random.normal(ks[1], (n * c, n * n + 2 * n)) / np.sqrt(n * c)
  alpha = scale * jnp.array([1.0, 0.7, 1.3])
  bias = scale * 0.3 * jax.random.normal(ks[2], (n * n + 2 * n,))
  return x, phi, alpha, bias


def _loss(fn):
  """A scalar with a distinct weight on every coefficient, so no cotangent is uniform."""
  def loss(*args):
    h_pre, h_post, h_res = fn(*args)
    w = lambda a, k: jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape) * k)
    return jnp.sum(w(h_pre, 0.3) * h_pre) + jnp.sum(w(h_post, 0.7) * h_post) + jnp.sum(
        w(h_res, 1.1) * h_res)
  return loss


def _rel(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))


# The full dtype x token-count grid for n = 4; n = 2 and 8 take half of it (bfloat16 with the
# ragged token count, float32 with the aligned one) to keep the suite fast.
_FORWARD_CASES = [
    dict(n=n, dtype=dtype, scale=scale, tokens=tokens)
    for n in (2, 4, 8) for dtype in (jnp.float32, jnp.bfloat16) for scale in (0.01, 30.0)
    for tokens in (128, 200) if n == 4 or (dtype == jnp.bfloat16) == (tokens == 200)
]


class CoefficientsTest(parameterized.TestCase):
  INTERPRET = None  # auto: interpret mode exactly on CPU

  def _kernel(self, bwd_impl="pallas"):
    bs = common.BlockSizes(interpret=self.INTERPRET)
    return lambda *a: kernels_pallas.mhc_coefficients(*a, block_sizes=bs, bwd_impl=bwd_impl, **KW)

  @parameterized.parameters(*_FORWARD_CASES)
  def test_forward(self, n, dtype, scale, tokens):
    args = _inputs(n, 128, tokens, dtype, scale)
    got = self._kernel()(*args)
    want = xla_coefficients.mhc_coefficients(*args, **KW)
    for g, w in zip(got, want):
      chex.assert_equal(g.dtype, jnp.float32)
      # bf16 streams: same f32 math. Logit rounding grows with the logit size (sharp: x30).
      chex.assert_trees_all_close(g, w, atol=F32_ATOL * max(1.0, scale), rtol=0)
    np.testing.assert_allclose(jnp.sum(got[2], axis=-1), 1.0, atol=1e-5)  # rows exact

  @parameterized.product(n=(2, 4, 8), scale=(0.01, 30.0))
  def test_vjp_matches_autodiff(self, n, scale):
    args = _inputs(n, 128, 200 if n == 4 else 128, jnp.float32, scale, seed=1)
    got = jax.grad(_loss(self._kernel()), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(_loss(lambda *a: xla_coefficients.mhc_coefficients(*a, **KW)),
                    argnums=(0, 1, 2, 3))(*args)
    for name, g, w in zip(("x", "phi", "alpha", "bias"), got, want):
      self.assertLess(_rel(g, w), 2e-5, msg=name)

  def test_vjp_bf16_streams(self):
    args = _inputs(4, 256, 200, jnp.bfloat16, 1.0, seed=2)
    got = jax.grad(_loss(self._kernel()), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(_loss(lambda *a: xla_coefficients.mhc_coefficients(*a, **KW)),
                    argnums=(0, 1, 2, 3))(*args)
    chex.assert_equal(got[0].dtype, jnp.bfloat16)
    # dx is rounded to bf16 on both paths: one bf16 ulp of the largest value is <= 2**-7 of it.
    self.assertLess(_rel(got[0], want[0].astype(jnp.float32)), 2 ** -7)
    for name, g, w in zip(("phi", "alpha", "bias"), got[1:], want[1:]):
      self.assertLess(_rel(g, w), 2e-5, msg=name)

  @parameterized.parameters(0.01, 3.0)
  def test_grad_against_float64(self, scale):
    """Kernel float32 gradients are as close to float64 as the float32 reference's are."""
    args = _inputs(4, 128, 128, jnp.float32, scale, seed=3)
    got = jax.grad(_loss(self._kernel()), argnums=(0, 1, 2, 3))(*args)
    ref32 = jax.grad(_loss(lambda *a: xla_coefficients.mhc_coefficients(*a, **KW)),
                     argnums=(0, 1, 2, 3))(*args)
    with jax.enable_x64(True):
      args64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in args]
      ref64 = jax.grad(_loss(lambda *a: kernels_pallas.coefficients_reference(
          *a, dtype=jnp.float64, **KW)), argnums=(0, 1, 2, 3))(*args64)
      ref64 = [np.asarray(r) for r in ref64]
    for name, g, r32, r64 in zip(("x", "phi", "alpha", "bias"), got, ref32, ref64):
      scale64 = np.max(np.abs(r64))
      err, err32 = (np.max(np.abs(np.asarray(a, np.float64) - r64)) / scale64 for a in (g, r32))
      self.assertLess(err, 4 * err32 + 1e-6, msg=name)

  def test_xla_backward_escape_hatch(self):
    args = _inputs(4, 128, 128, jnp.float32, 1.0, seed=4)
    got = jax.grad(_loss(self._kernel("xla")), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(_loss(self._kernel("pallas")), argnums=(0, 1, 2, 3))(*args)
    for g, w in zip(got, want):
      self.assertLess(_rel(g, w), 2e-5)

  def test_loops_and_token_rows_match(self):
    """`BlockSizes(loops=True)` (the GPU path: chunk and Sinkhorn loops, the backward recomputing
    each iterate) and streams given as token rows `(..., n*C)`: same coefficients and grads."""
    x, phi, alpha, bias = _inputs(4, 256, 200, jnp.float32, 3.0, seed=6)
    bs = common.BlockSizes(coef_k=128, loops=True, interpret=self.INTERPRET)
    looped = lambda x, *a: kernels_pallas.mhc_coefficients(
        x.reshape(*x.shape[:-2], -1), *a, token_rows=True, block_sizes=bs, **KW)
    for g, w in zip(looped(x, phi, alpha, bias), self._kernel()(x, phi, alpha, bias)):
      chex.assert_trees_all_close(g, w, atol=F32_ATOL, rtol=0)
    got = jax.grad(_loss(looped), argnums=(0, 1, 2, 3))(x, phi, alpha, bias)
    want = jax.grad(_loss(self._kernel()), argnums=(0, 1, 2, 3))(x, phi, alpha, bias)
    for name, g, w in zip(("x", "phi", "alpha", "bias"), got, want):
      self.assertLess(_rel(g, w), 1e-5, msg=name)

  @parameterized.parameters(1, 2, 20)
  def test_sinkhorn_loop_vjp_matches_the_taped_one(self, num_iters):
    n = 4
    logits = 5.0 * jax.random.normal(jax.random.key(7), (n, n, 7))
    dm = jax.random.normal(jax.random.key(8), (n, n, 7))
    rows = lambda a: [a[i] for i in range(n)]
    kw = dict(num_iters=num_iters, eps=1e-6)
    chex.assert_trees_all_close(
        kernel_sinkhorn.sinkhorn_vjp(rows(logits), rows(dm), loop=True, **kw),
                                kernel_sinkhorn.sinkhorn_vjp(rows(logits), rows(dm), **kw),
                                atol=1e-6, rtol=1e-5)

  def test_sinkhorn_vjp_helper_matches_autodiff(self):
    n = 4
    logits = 5.0 * jax.random.normal(jax.random.key(5), (n, n, 7))
    dm = jax.random.normal(jax.random.key(6), (n, n, 7))
    rows = lambda a: [a[i] for i in range(n)]  # row i as (n, tokens), as the kernels hold it
    got = kernel_sinkhorn.sinkhorn_vjp(rows(logits), rows(dm), num_iters=20, eps=1e-6)
    _, vjp = jax.vjp(lambda l: sinkhorn.sinkhorn_knopp(jnp.moveaxis(l, -1, 0)), logits)
    want = rows(vjp(jnp.moveaxis(dm, -1, 0))[0])
    chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-5)

  def test_rejects_unsupported_width(self):
    args = _inputs(4, 128, 16, jnp.float32, 1.0)
    x = jnp.zeros((2, 8, 4, 96))
    with self.assertRaisesRegex(ValueError, "C=96 is not a positive multiple of 128"):
      kernels_pallas.mhc_coefficients(x, jnp.zeros((384, 24)), *args[2:], **KW)
    self.assertFalse(kernels_pallas.supports(4, 96))
    self.assertTrue(kernels_pallas.supports(4, 1280))

  def test_rejects_bad_shapes_and_layouts(self):
    x, phi, alpha, bias = _inputs(4, 128, 16, jnp.float32, 1.0)
    with self.assertRaisesRegex(ValueError, "bias must have shape"):
      kernels_pallas.mhc_coefficients(x, phi, alpha, bias[:-1], **KW)
    with self.assertRaisesRegex(ValueError, "phi has shape"):
      kernels_pallas.mhc_coefficients(x, phi[:, :-1], alpha, bias, **KW)
    rows = x.reshape(*x.shape[:-2], -1)
    with self.assertRaisesRegex(ValueError, "need token_rows=True"):  # no guessing the layout
      kernels_pallas.mhc_coefficients(rows, phi, alpha, bias, **KW)

  def test_block_sizes_validated(self):
    with self.assertRaisesRegex(ValueError, "coef_k=100"):
      common.BlockSizes(coef_k=100)

  def test_on_chip_budget_names_the_field_to_shrink(self):
    # n=8, C=2560, bf16 on TPU: 1024-token stream blocks need ~93 MiB of VMEM (budget 64 MiB).
    big = common.BlockSizes(coef_tokens=1024, backend="tpu")
    with self.assertRaisesRegex(ValueError, r"BlockSizes.coef_tokens=1024: .* Halve"):
      common.check_budget(8, 2560, 2, big, "tpu")
    # Triton's dot tiles at coef_k=512: (128 + 32) x 512 x 4 = 327,680 B > 232,448 B of H100
    # shared memory, the figure Triton itself reported for this kernel.
    self.assertEqual(common.coefficients_bytes(4, 1280, 2, common.BlockSizes(coef_k=512), "gpu",
                                               20), 327_680)
    with self.assertRaisesRegex(ValueError, r"BlockSizes.coef_k=512"):
      common.check_budget(4, 1280, 2, common.BlockSizes(coef_k=512), "gpu")
    for backend_name in ("tpu", "gpu"):  # the defaults fit at the paper's largest shape
      common.check_budget(8, 2560, 4, common.BlockSizes.for_backend(backend_name), backend_name)


class CoefficientsInterpretTest(CoefficientsTest):
  INTERPRET = True

  def setUp(self):
    super().setUp()
    if jax.default_backend() == "cpu":
      self.skipTest("on CPU the auto path of CoefficientsTest already runs in interpret mode")


if __name__ == "__main__":
  absltest.main()
