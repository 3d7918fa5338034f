"""The kernels (forward and backward) lower for TPU (Mosaic) and CUDA (Triton) on a CPU host.

Lowering builds and verifies the kernel IR; it cannot compile it without the device.
"""

import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized

from kernels_pallas import common
import kernels_pallas

N, C, TOKENS = 4, 1280, 200  # paper width; a token count that is not a multiple of the blocks


def _layer_grad(bs):
  def loss(x, phi, alpha, bias, y):
    h_pre, h_post, h_res = kernels_pallas.mhc_coefficients(
        x, phi, alpha, bias, num_iters=20, eps=1e-6, post_scale=2.0, block_sizes=bs)
    u = kernels_pallas.pre_mix(x, h_pre, block_sizes=bs)
    out = kernels_pallas.post_res_mix(x, y + u, h_post, h_res, block_sizes=bs)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))
  return jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def _avals(dtype, n=N):
  f32 = jnp.float32
  return (jax.ShapeDtypeStruct((2, TOKENS // 2, n, C), dtype),
          jax.ShapeDtypeStruct((n * C, n * n + 2 * n), f32), jax.ShapeDtypeStruct((3,), f32),
          jax.ShapeDtypeStruct((n * n + 2 * n,), f32),
          jax.ShapeDtypeStruct((2, TOKENS // 2, C), dtype))


class LoweringTest(parameterized.TestCase):

  @parameterized.product(
      (dict(platform="tpu", backend="tpu", marker="tpu_custom_call"),
       dict(platform="cuda", backend="gpu", marker="triton")),
      dtype=(jnp.float32, jnp.bfloat16), n=(4, 8))
  def test_lowers(self, platform, backend, marker, dtype, n):
    bs = common.BlockSizes.for_backend(backend, backend=backend)
    text = jax.jit(_layer_grad(bs)).trace(*_avals(dtype, n)).lower(
        lowering_platforms=(platform,)).as_text()
    # fwd coefficients, pre_mix; bwd of all three (post_res_mix's fwd is dead under grad).
    self.assertGreaterEqual(text.count(marker), 5)


if __name__ == "__main__":
  absltest.main()
