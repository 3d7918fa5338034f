"""mHC coefficients `H_pre, H_post, H_res` from the residual streams (math.md §3, Eq. 7–8).

Layout of the `n*n + 2n` logits: `[pre (n) | post (n) | res (n*n, row-major)]`, so that
`h[2n + i*n + j]` is the logit of `H_res[i, j]`. Everything here runs in float32 whatever the
activation dtype.
"""

import jax
import jax.numpy as jnp

from mhc_jax.core.sinkhorn import DEFAULT_EPS, DEFAULT_NUM_ITERS, sinkhorn_knopp


def num_logits(n: int) -> int:
  """Width of the coefficient projection `phi`: n (pre) + n (post) + n*n (res)."""
  return n * n + 2 * n


def expand_alpha(alpha_3: jax.Array, n: int, num_res: int | None = None,
                 dtype=jnp.float32) -> jax.Array:
  """Broadcasts `(alpha_pre, alpha_post, alpha_res)` to the logit layout `[n | n | num_res]`
  (`num_res` = n*n for mHC, n! for mHC-lite)."""
  num_res = n * n if num_res is None else num_res
  return jnp.repeat(alpha_3.astype(dtype), jnp.array([n, n, num_res]),
                    total_repeat_length=2 * n + num_res)


def coefficients_from_logits(
    h: jax.Array, n: int, *, num_iters: int = DEFAULT_NUM_ITERS, eps: float = DEFAULT_EPS,
    post_scale: float = 2.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Splits `(..., n*n + 2n)` logits into `(h_pre (..., n), h_post (..., n), h_res (..., n, n))`."""
  h = h.astype(jnp.float32)
  h_pre = jax.nn.sigmoid(h[..., :n]) + eps
  h_post = post_scale * jax.nn.sigmoid(h[..., n:2 * n])
  h_res = sinkhorn_knopp(h[..., 2 * n:].reshape(*h.shape[:-1], n, n), num_iters=num_iters, eps=eps)
  return h_pre, h_post, h_res


def rms_scale(x: jax.Array, eps: float = DEFAULT_EPS, axis=-1) -> jax.Array:
  """`rsqrt(mean(x**2) + eps)` over `axis` (an int or tuple), float32, keepdims."""
  x = x.astype(jnp.float32)
  return jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=True) + eps)


@jax.custom_vjp
def project(x_xNxC: jax.Array, phi_NCxK: jax.Array) -> jax.Array:
  """`vec(x) @ phi` for a thin `phi` (K = n*n + 2n columns), float32, `(..., K)`.

  Takes the streams unflattened and keeps `x` itself as the VJP residual, so under `nn.scan` it
  shares one stacked copy per layer with the stream-mixing VJPs. Plain autodiff of a dot on the
  flattened `v` stacked a second copy: 1227 vs 1099 MiB compiled temp memory for the mHC train
  step at d_model 512 (4 blocks, seq 256, batch 8).
  """
  v = x_xNxC.reshape(*x_xNxC.shape[:-2], -1).astype(jnp.float32)
  return jnp.dot(v, phi_NCxK, precision=jax.lax.Precision.HIGHEST)


def _project_fwd(x_xNxC, phi_NCxK):
  return project(x_xNxC, phi_NCxK), (x_xNxC, phi_NCxK)


def _project_bwd(res, dproj_xK):
  x_xNxC, phi_NCxK = res
  hi = jax.lax.Precision.HIGHEST
  dx = jnp.dot(dproj_xK, phi_NCxK.T, precision=hi).reshape(x_xNxC.shape).astype(x_xNxC.dtype)
  v_TxNC = x_xNxC.reshape(-1, phi_NCxK.shape[0]).astype(jnp.float32)
  dphi_KxNC = jnp.dot(dproj_xK.reshape(-1, phi_NCxK.shape[1]).T, v_TxNC, precision=hi)
  return dx, dphi_KxNC.T


project.defvjp(_project_fwd, _project_bwd)


def dynamic_logits(x_xNxC: jax.Array, phi_NCxK: jax.Array, alpha_K: jax.Array, bias_K: jax.Array,
                   eps: float = DEFAULT_EPS) -> jax.Array:
  """`alpha * (vec(x) @ phi) * rsqrt(mean(vec(x)**2) + eps) + bias`, float32 `(..., K)`.

  The logits of every dynamic connection map (mHC, mHC-lite, the gated exit); `alpha_K` is a
  scalar or already broadcast to the K logits.
  """
  r = rms_scale(x_xNxC, eps, axis=(-2, -1))[..., 0]  # (..., 1): RMS over all n*C values
  return alpha_K * project(x_xNxC, phi_NCxK.astype(jnp.float32)) * r + bias_K.astype(jnp.float32)


def _check_shapes(x, phi, alpha, bias):
  if x.ndim < 2:
    raise ValueError(f"mhc_coefficients: x must have shape (..., n, C); got {x.shape}.")
  n, c = x.shape[-2:]
  want_phi = (n * c, num_logits(n))
  if phi.shape != want_phi:
    raise ValueError(
        f"mhc_coefficients: phi has shape {phi.shape}, expected (n*C, n*n + 2n) = {want_phi} "
        f"for x of shape {x.shape} (n={n}, C={c})."
    )
  if alpha.shape != (3,):
    raise ValueError(f"mhc_coefficients: alpha must have shape (3,); got {alpha.shape}.")
  if bias.shape != (num_logits(n),):
    raise ValueError(
        f"mhc_coefficients: bias has shape {bias.shape}, expected ({num_logits(n)},) for n={n}."
    )


def mhc_coefficients(
    x: jax.Array, phi: jax.Array, alpha: jax.Array, bias: jax.Array, *,
    num_iters: int = DEFAULT_NUM_ITERS, eps: float = DEFAULT_EPS, post_scale: float = 2.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Computes `(h_pre (..., n), h_post (..., n), h_res (..., n, n))` from streams `x (..., n, C)`.

  `v = vec(x)` is stream-major; `h = alpha * (v @ phi) * rsqrt(mean(v**2) + eps) + bias`, then
  `sigmoid + eps`, `post_scale * sigmoid` and Sinkhorn. `v @ phi` is computed before the RMS
  scale, as the fused kernel does (one read of `v`, two reductions). The fused kernel of the
  same map is `kernels_pallas.mhc_coefficients` (`mhc_jax.mhc_coefficients(..., impl="pallas")`).
  """
  _check_shapes(x, phi, alpha, bias)
  n = x.shape[-2]
  h = dynamic_logits(x, phi, expand_alpha(alpha, n), bias, eps)
  return coefficients_from_logits(h, n, num_iters=num_iters, eps=eps, post_scale=post_scale)
