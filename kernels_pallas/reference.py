"""Plain-jnp references of the kernels, built on the same helpers (`common.py`) as the kernels.

`dtype=jnp.float64` (under `jax.experimental.enable_x64`) gives the float64 references that the
gradient tests use; the default float32 path equals `mhc_jax`'s XLA implementation.
"""

import jax
import jax.numpy as jnp

from kernels_pallas import common
from mhc_jax.coefficients import expand_alpha


def coefficients_reference(x, phi, alpha, bias, *, num_iters, eps, post_scale, dtype=jnp.float32):
  """`(h_pre (..., n), h_post (..., n), h_res (..., n, n))` from streams `x (..., n, C)`."""
  n, c = x.shape[-2:]
  v = x.reshape(*x.shape[:-2], n * c).astype(dtype)
  proj = jnp.dot(v, phi.astype(dtype), precision=jax.lax.Precision.HIGHEST)
  rms = jax.lax.rsqrt(jnp.mean(jnp.square(v), axis=-1, keepdims=True) + eps)
  h = expand_alpha(alpha, n, dtype) * proj * rms + bias.astype(dtype)
  rows = lambda k: jnp.moveaxis(h[..., k:k + n], -1, 0)  # (n, ...) as the kernels hold them
  pre, post, res = common.coefficients_from_rows(
      rows(0), rows(n), [rows(2 * n + i * n) for i in range(n)], num_iters=num_iters, eps=eps,
      post_scale=post_scale)
  h_res = jnp.stack([jnp.moveaxis(r, 0, -1) for r in res], axis=-2)
  return jnp.moveaxis(pre, 0, -1), jnp.moveaxis(post, 0, -1), h_res


def pre_mix_reference(x_BxSxNxC, h_pre_BxSxN, dtype=jnp.float32):
  """`u = sum_j h_pre[j] x_j`, accumulated in `dtype`, returned in x's dtype."""
  u = jnp.sum(h_pre_BxSxN.astype(dtype)[..., None] * x_BxSxNxC.astype(dtype), axis=-2)
  return u.astype(x_BxSxNxC.dtype)


def post_res_mix_reference(x_BxSxNxC, y_BxSxC, h_post_BxSxN, h_res_BxSxNxN, dtype=jnp.float32):
  """`x'_i = sum_j h_res[i, j] x_j + h_post[i] y`, accumulated in `dtype`."""
  x = x_BxSxNxC.astype(dtype)
  mixed = jnp.einsum("...ij,...jc->...ic", h_res_BxSxNxN.astype(dtype), x,
                     precision=jax.lax.Precision.HIGHEST)
  out = mixed + h_post_BxSxN.astype(dtype)[..., None] * y_BxSxC.astype(dtype)[..., None, :]
  return out.astype(x_BxSxNxC.dtype)
