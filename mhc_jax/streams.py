"""Applying connection coefficients to the n residual streams (spec §2, §9).

`pre_mix` collapses the streams into the sublayer input; `post_res_mix` fuses the residual
mixing `H_res x` with the write-back `H_post^T y` so that XLA (or the Pallas kernel) reads
`(n+1)C` and writes `nC` per token. Both are written as broadcast-multiply-reduce over the tiny
stream axis, never as batched `n x n` matmuls, which XLA would lower to slow batched dots.
Accumulation is float32; results come back in the activation dtype of `x`.
"""

import jax
import jax.numpy as jnp


def expand_streams(x_BxSxC: jax.Array, n: int) -> jax.Array:
  """Entry: replicates the token embedding to every stream, `(B, S, C) -> (B, S, n, C)`."""
  return jnp.broadcast_to(x_BxSxC[..., None, :], (*x_BxSxC.shape[:-1], n, x_BxSxC.shape[-1]))


def pre_mix(x_BxSxNxC: jax.Array, h_pre_BxSxN: jax.Array, *, impl: str = "xla") -> jax.Array:
  """`u = sum_i h_pre[i] * x_i`, `(..., n, C) -> (..., C)`."""
  if impl == "pallas":
    import kernels_pallas  # pylint: disable=g-import-not-at-top
    return kernels_pallas.pre_mix(x_BxSxNxC, h_pre_BxSxN)
  u = jnp.sum(h_pre_BxSxN[..., :, None] * x_BxSxNxC.astype(jnp.float32), axis=-2)
  return u.astype(x_BxSxNxC.dtype)


def post_res_mix(
    x_BxSxNxC: jax.Array, y_BxSxC: jax.Array, h_post_BxSxN: jax.Array,
    h_res_BxSxNxN: jax.Array, *, impl: str = "xla",
) -> jax.Array:
  """`x'_i = sum_j h_res[i, j] * x_j + h_post[i] * y`, `(..., n, C) -> (..., n, C)`."""
  if impl == "pallas":
    import kernels_pallas  # pylint: disable=g-import-not-at-top
    return kernels_pallas.post_res_mix(x_BxSxNxC, y_BxSxC, h_post_BxSxN, h_res_BxSxNxN)
  x = x_BxSxNxC.astype(jnp.float32)
  mixed = jnp.sum(h_res_BxSxNxN[..., :, :, None] * x[..., None, :, :], axis=-2)
  out = mixed + h_post_BxSxN[..., :, None] * y_BxSxC.astype(jnp.float32)[..., None, :]
  return out.astype(x_BxSxNxC.dtype)
