"""Public mHC kernel ops: validation, flattening to tokens, dispatch and custom VJPs.

Each op is `jax.jit` with its statics, wrapping a `jax.custom_vjp` whose statics sit in
`nondiff_argnums`; `jax.grad` through a raw `pallas_call` would fail.
"""

import functools
import math

import jax
import jax.numpy as jnp

from kernels_pallas import bwd, common, fwd, reference
from mhc_jax.coefficients import expand_alpha

_HIGHEST = jax.lax.Precision.HIGHEST
BWD_IMPLS = ("pallas", "xla")


def _resolve(block_sizes):
  name = common.backend(block_sizes)
  return block_sizes or common.BlockSizes.for_backend(name), name


def _streams_shape(fn, x, flat, n, block_sizes, *coefs):
  """`(lead, n, C)` of streams `x`: `(..., n, C)`, or token rows `(..., n*C)` when `flat`."""
  if flat:
    if x.ndim < 1 or x.shape[-1] % max(n, 1):
      raise ValueError(f"{fn}: flat streams must have shape (..., n*C) with n={n}; got {x.shape}.")
    lead, c = x.shape[:-1], x.shape[-1] // n
  else:
    if x.ndim < 2:
      raise ValueError(f"{fn}: x must have shape (..., n, C); got {x.shape}.")
    lead, (n, c) = x.shape[:-2], x.shape[-2:]
  common.check_supported(n, c, block_sizes)
  for name, arr, tail in coefs:
    if arr.shape != (*lead, *tail(n, c)):
      raise ValueError(f"{fn}: {name} has shape {arr.shape}, expected {(*lead, *tail(n, c))} for "
                       f"x of shape {x.shape}.")
  return lead, n, c


# ----- coefficients -----

_COEF_STATICS = ("num_iters", "eps", "post_scale", "block_sizes", "bwd_impl")


@functools.partial(jax.jit, static_argnames=_COEF_STATICS)
def mhc_coefficients(x, phi, alpha, bias, *, num_iters=20, eps=1e-6, post_scale=2.0,
                     block_sizes=None, bwd_impl="pallas"):
  """Fused `(h_pre (..., n), h_post (..., n), h_res (..., n, n))` float32 from `x (..., n, C)`.

  `x` may also be token rows `(..., n*C)` (n > 1), the layout the kernels read without a copy.
  `bwd_impl="xla"` differentiates the plain-jnp reference instead of the backward kernel.
  """
  n = math.isqrt(bias.shape[-1] + 1) - 1 if bias.ndim == 1 else 0
  flat = n > 1 and x.shape[-1] == phi.shape[0] and phi.shape[0] % n == 0
  _, n, c = _streams_shape("mhc_coefficients", x, flat, n, block_sizes)
  k = n * n + 2 * n
  for name, arr, want in (("phi", phi, (n * c, k)), ("alpha", alpha, (3,)), ("bias", bias, (k,))):
    if arr.shape != want:
      raise ValueError(f"mhc_coefficients: {name} has shape {arr.shape}, expected {want} for n={n}, "
                       f"C={c}.")
  if bwd_impl not in BWD_IMPLS:
    raise ValueError(f"mhc_coefficients: bwd_impl must be one of {BWD_IMPLS}; got {bwd_impl!r}.")
  if num_iters < 1:
    raise ValueError(f"mhc_coefficients: num_iters must be >= 1; got {num_iters}.")
  common.check_budget(n, c, x.dtype.itemsize, *_resolve(block_sizes), num_iters)
  return _coefficients(x, phi, alpha, bias, num_iters, eps, post_scale, block_sizes, bwd_impl, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _coefficients(x, phi, alpha, bias, num_iters, eps, post_scale, block_sizes, bwd_impl, n):
  return _coefficients_fwd(
      x, phi, alpha, bias, num_iters, eps, post_scale, block_sizes, bwd_impl, n)[0]


def _padded_params(phi, alpha, bias, n, kp):
  k = n * n + 2 * n
  phi_t_KxNC = jnp.pad(phi.astype(jnp.float32).T, ((0, kp - k), (0, 0)))
  alpha_Kx1 = jnp.pad(expand_alpha(alpha, n), (0, kp - k))[:, None]
  bias_Kx1 = jnp.pad(bias.astype(jnp.float32), (0, kp - k))[:, None]
  return phi_t_KxNC, alpha_Kx1, bias_Kx1


def _lead(x, phi, n):
  """Leading (token) dims of streams `(..., n, C)` or `(..., n*C)`, given phi `(n*C, K)`."""
  return x.shape[:-1] if x.shape[-1] == phi.shape[0] and n > 1 else x.shape[:-2]


def _coefficients_fwd(x, phi, alpha, bias, num_iters, eps, post_scale, block_sizes, bwd_impl, n):
  bs, name = _resolve(block_sizes)
  lead, c = _lead(x, phi, n), phi.shape[0] // n
  t, k = math.prod(lead), n * n + 2 * n
  phi_t, alpha_k, bias_k = _padded_params(phi, alpha, bias, n, common.padded_logits(k, name))
  coef_KxT, proj_KxT, rms_1xT = fwd.coefficients_fwd(
      x.reshape(t, n * c), phi_t, alpha_k, bias_k, n=n, num_iters=num_iters, eps=eps,
      post_scale=post_scale, block_sizes=bs, backend_name=name)
  coef_TxK = coef_KxT[:k].T
  out = (coef_TxK[:, :n].reshape(*lead, n), coef_TxK[:, n:2 * n].reshape(*lead, n),
         coef_TxK[:, 2 * n:].reshape(*lead, n, n))
  if bwd_impl == "xla":
    return out, (x, phi, alpha, bias)
  return out, (x, phi, alpha, bias, proj_KxT, rms_1xT)


def _coefficients_bwd(num_iters, eps, post_scale, block_sizes, bwd_impl, n, res, cts):
  if bwd_impl == "xla":
    x, phi, alpha, bias = res
    lead, c = _lead(x, phi, n), phi.shape[0] // n
    ref = lambda x, *p: reference.coefficients_reference(
        x.reshape(*lead, n, c), *p, num_iters=num_iters, eps=eps, post_scale=post_scale)
    return jax.vjp(ref, *res)[1](cts)
  x, phi, alpha, bias, proj_KxT, rms_1xT = res
  bs, name = _resolve(block_sizes)
  lead, c = _lead(x, phi, n), phi.shape[0] // n
  t, k = math.prod(lead), n * n + 2 * n
  kp = proj_KxT.shape[0]
  _, alpha_k, bias_k = _padded_params(phi, alpha, bias, n, kp)
  g_pre, g_post, g_res = cts
  g_TxK = jnp.concatenate(
      [g_pre.reshape(t, n), g_post.reshape(t, n), g_res.reshape(t, n * n)], axis=-1)
  dh_KxT = bwd.coefficients_bwd(
      proj_KxT, rms_1xT, jnp.pad(g_TxK.astype(jnp.float32).T, ((0, kp - k), (0, 0))), alpha_k,
      bias_k, n=n, num_iters=num_iters, eps=eps, post_scale=post_scale, block_sizes=bs,
      backend_name=name)
  # h = a * proj * rms + b, rms = rsqrt(sum(v**2) / nC + eps): the rest is XLA dots and sums.
  dh_TxK, proj_TxK, rms_Tx1 = dh_KxT[:k].T, proj_KxT[:k].T, rms_1xT[0][:, None]
  a_K = expand_alpha(alpha, n)
  d_alpha_K = jnp.sum(dh_TxK * proj_TxK * rms_Tx1, axis=0)
  d_alpha = jnp.stack([jnp.sum(d_alpha_K[:n]), jnp.sum(d_alpha_K[n:2 * n]),
                       jnp.sum(d_alpha_K[2 * n:])])
  d_proj_TxK = dh_TxK * a_K * rms_Tx1
  d_rms_Tx1 = jnp.sum(dh_TxK * a_K * proj_TxK, axis=-1, keepdims=True)
  v_TxNC = x.reshape(t, n * c).astype(jnp.float32)
  dv_TxNC = (jnp.dot(d_proj_TxK, phi.astype(jnp.float32).T, precision=_HIGHEST)
             - v_TxNC * (d_rms_Tx1 * rms_Tx1 ** 3 / (n * c)))
  d_phi = jnp.dot(v_TxNC.T, d_proj_TxK, precision=_HIGHEST)
  return (dv_TxNC.astype(x.dtype).reshape(x.shape), d_phi.astype(phi.dtype),
          d_alpha.astype(alpha.dtype), jnp.sum(dh_TxK, axis=0).astype(bias.dtype))


_coefficients.defvjp(_coefficients_fwd, _coefficients_bwd)


# ----- pre_mix -----

def _coef_cols(h, t, width):
  """`(..., m)` coefficients -> float32 `(t, next_pow2(m))` (a power of two for Triton)."""
  h = h.reshape(t, width).astype(jnp.float32)
  return jnp.pad(h, ((0, 0), (0, common.next_pow2(width) - width)))


@functools.partial(jax.jit, static_argnames=("block_sizes",))
def pre_mix(x_BxSxNxC, h_pre_BxSxN, *, block_sizes=None):
  """`u = sum_j h_pre[j] x_j`, `(..., n, C) -> (..., C)` in x's dtype.

  `x` may also be token rows `(..., n*C)` (then it has h_pre's rank).
  """
  flat = x_BxSxNxC.ndim == h_pre_BxSxN.ndim
  _, n, c = _streams_shape("pre_mix", x_BxSxNxC, flat, h_pre_BxSxN.shape[-1], block_sizes,
                           ("h_pre", h_pre_BxSxN, lambda n, c: (n,)))
  common.check_budget(n, c, x_BxSxNxC.dtype.itemsize, *_resolve(block_sizes))
  return _pre_mix(x_BxSxNxC, h_pre_BxSxN, block_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pre_mix(x, h_pre, block_sizes):
  return _pre_mix_fwd(x, h_pre, block_sizes)[0]


def _pre_mix_fwd(x, h_pre, block_sizes):
  bs, name = _resolve(block_sizes)
  lead, n = h_pre.shape[:-1], h_pre.shape[-1]
  t, c = math.prod(lead), x.size // (math.prod(lead) * n)
  u = fwd.pre_mix_fwd(x.reshape(t, n * c), _coef_cols(h_pre, t, n), n=n, block_sizes=bs,
                      backend_name=name)
  return u.reshape(*lead, c), (x, h_pre)


def _pre_mix_bwd(block_sizes, res, du):
  x, h_pre = res
  bs, name = _resolve(block_sizes)
  lead, n = h_pre.shape[:-1], h_pre.shape[-1]
  t, c = math.prod(lead), du.shape[-1]
  dx, dh_parts = bwd.pre_mix_bwd(
      x.reshape(t, n * c), _coef_cols(h_pre, t, n), du.reshape(t, c).astype(x.dtype), n=n,
      block_sizes=bs, backend_name=name)
  dh = jnp.sum(dh_parts, axis=(0, 1))[:, :n].reshape(h_pre.shape)
  return dx.reshape(x.shape), dh.astype(h_pre.dtype)


_pre_mix.defvjp(_pre_mix_fwd, _pre_mix_bwd)


# ----- post_res_mix -----

@functools.partial(jax.jit, static_argnames=("block_sizes",))
def post_res_mix(x_BxSxNxC, y_BxSxC, h_post_BxSxN, h_res_BxSxNxN, *, block_sizes=None):
  """Fused `x'_i = sum_j h_res[i, j] x_j + h_post[i] y`: reads (n+1)C, writes nC per token.

  `x` may also be token rows `(..., n*C)` (then it has y's rank); the result has x's shape.
  """
  flat = x_BxSxNxC.ndim == y_BxSxC.ndim
  _, n, c = _streams_shape(
      "post_res_mix", x_BxSxNxC, flat, h_post_BxSxN.shape[-1], block_sizes,
      ("y", y_BxSxC, lambda n, c: (c,)), ("h_post", h_post_BxSxN, lambda n, c: (n,)),
      ("h_res", h_res_BxSxNxN, lambda n, c: (n, n)))
  common.check_budget(n, c, x_BxSxNxC.dtype.itemsize, *_resolve(block_sizes))
  return _post_res_mix(x_BxSxNxC, y_BxSxC, h_post_BxSxN, h_res_BxSxNxN, block_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _post_res_mix(x, y, h_post, h_res, block_sizes):
  return _post_res_mix_fwd(x, y, h_post, h_res, block_sizes)[0]


def _post_res_mix_fwd(x, y, h_post, h_res, block_sizes):
  bs, name = _resolve(block_sizes)
  lead, (n, c) = y.shape[:-1], (h_post.shape[-1], y.shape[-1])
  t = math.prod(lead)
  out = fwd.post_res_mix_fwd(
      x.reshape(t, n * c), y.reshape(t, c), _coef_cols(h_post, t, n),
      _coef_cols(h_res, t, n * n), n=n, block_sizes=bs, backend_name=name)
  return out.reshape(x.shape), (x, y, h_post, h_res)


def _post_res_mix_bwd(block_sizes, res, g):
  x, y, h_post, h_res = res
  bs, name = _resolve(block_sizes)
  lead, (n, c) = y.shape[:-1], (h_post.shape[-1], y.shape[-1])
  t = math.prod(lead)
  dx, dy, dhp_parts, dhr_parts = bwd.post_res_mix_bwd(
      x.reshape(t, n * c), y.reshape(t, c), _coef_cols(h_post, t, n),
      _coef_cols(h_res, t, n * n), g.reshape(t, n * c).astype(x.dtype), n=n, block_sizes=bs,
      backend_name=name)
  dh_post = jnp.sum(dhp_parts, axis=0)[:, :n].reshape(h_post.shape)
  dh_res = jnp.sum(dhr_parts, axis=(0, 1))[:, :n * n].reshape(h_res.shape)
  return (dx.reshape(x.shape), dy.reshape(y.shape), dh_post.astype(h_post.dtype),
          dh_res.astype(h_res.dtype))


_post_res_mix.defvjp(_post_res_mix_fwd, _post_res_mix_bwd)
