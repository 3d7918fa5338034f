"""The fused mHC coefficient op (math.md §3–4, §9): kernels, custom VJP and reference together.

Forward kernel, per block of tokens: the stream block `(bt, nC)` stays in the activation dtype
on chip and is contracted with phi in chunks of `coef_k` lanes, accumulating `proj (K, bt)` and
`sum(v**2)` in float32 in one pass; then the coefficient math (`sinkhorn.py`) runs on the
lane-dense `(K, tokens)` tile. The backward kernel rebuilds the logits from the saved `proj` and
`rms`, recomputes the Sinkhorn iterates on chip and returns d(logits); `dphi` and `dx` are XLA
dots. `bwd_impl="xla"` differentiates `coefficients_reference` instead.

Logit layout `[pre (n) | post (n) | res (n*n, row-major)]`, as in `mhc_jax.core.coefficients`.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas import common, sinkhorn

_HIGHEST = jax.lax.Precision.HIGHEST
BWD_IMPLS = ("pallas", "xla")
STATICS = ("num_iters", "eps", "post_scale", "token_rows", "block_sizes", "bwd_impl")


def alpha_per_logit(alpha_3, n, dtype=jnp.float32):
  """`(alpha_pre, alpha_post, alpha_res)` broadcast to the `n*n + 2n` logits."""
  return jnp.repeat(alpha_3.astype(dtype), jnp.array([n, n, n * n]),
                    total_repeat_length=n * n + 2 * n)


def coefficients_reference(x_xNxC, phi, alpha, bias, *, num_iters, eps, post_scale,
                           dtype=jnp.float32):
  """Plain jnp on the kernels' helpers: `(h_pre (..., n), h_post (..., n), h_res (..., n, n))`.

  `dtype=jnp.float64` (under `jax.experimental.enable_x64`) is the gradient tests' reference.
  """
  n, c = x_xNxC.shape[-2:]
  v = x_xNxC.reshape(*x_xNxC.shape[:-2], n * c).astype(dtype)
  proj = jnp.dot(v, phi.astype(dtype), precision=_HIGHEST)
  rms = jax.lax.rsqrt(jnp.mean(jnp.square(v), axis=-1, keepdims=True) + eps)
  h = alpha_per_logit(alpha, n, dtype) * proj * rms + bias.astype(dtype)
  rows = lambda k: jnp.moveaxis(h[..., k:k + n], -1, 0)  # (n, ...) as the kernels hold them
  pre, post, res = sinkhorn.coefficients_from_rows(
      rows(0), rows(n), [rows(2 * n + i * n) for i in range(n)], num_iters=num_iters, eps=eps,
      post_scale=post_scale)
  h_res = jnp.stack([jnp.moveaxis(r, 0, -1) for r in res], axis=-2)
  return jnp.moveaxis(pre, 0, -1), jnp.moveaxis(post, 0, -1), h_res


# ----- kernels -----

def _logit_rows(proj_ref, rms, alpha_ref, bias_ref, n):
  """`h = alpha * proj * rms + bias` as `pre (n, bt)`, `post (n, bt)` and n res rows."""
  h = lambda k: common.load_rows(alpha_ref, k, n) * common.load_rows(proj_ref, k, n) * rms + (
      common.load_rows(bias_ref, k, n))
  return h(0), h(n), [h(2 * n + i * n) for i in range(n)]


def _store_rows(ref, pre, post, res_rows):
  n = pre.shape[0]
  ref[pl.ds(0, n), :] = pre
  ref[pl.ds(n, n), :] = post
  for i, row in enumerate(res_rows):
    ref[pl.ds(2 * n + i * n, n), :] = row


def _fwd_kernel(x_ref, phi_t_ref, alpha_ref, bias_ref, coef_ref, proj_ref, rms_ref, *,
                n, num_iters, eps, post_scale, block_k, backend_name, loop):
  """One token block: `proj = phi^T v`, `sum(v**2)` in one pass, then the coefficient math."""
  bt, width = x_ref.shape
  ones = jnp.ones((common.SUMSQ_ROWS, block_k), jnp.float32)

  def chunk(c, acc):
    proj, sumsq = acc
    cols = pl.ds(pl.multiple_of(c * block_k, block_k), block_k)
    v = x_ref[:, cols].astype(jnp.float32)
    proj += common.dot_nt(phi_t_ref[:, cols].astype(jnp.float32), v)
    return proj, sumsq + common.dot_nt(ones, v * v)  # every row holds sum(v**2), lane-dense

  proj, sumsq = jax.lax.fori_loop(
      0, width // block_k, chunk, (jnp.zeros((phi_t_ref.shape[0], bt), jnp.float32),
                                   jnp.zeros((common.SUMSQ_ROWS, bt), jnp.float32)),
      unroll=not loop)
  rms = jax.lax.rsqrt(jnp.max(sumsq, axis=0, keepdims=True) / width + eps)
  proj_ref[...] = proj
  rms_ref[...] = rms
  if backend_name == "gpu":
    pltriton.debug_barrier()  # rows are read back by other threads of the program
  coef = sinkhorn.coefficients_from_rows(
      *_logit_rows(proj_ref, rms, alpha_ref, bias_ref, n), num_iters=num_iters, eps=eps,
      post_scale=post_scale, loop=loop)
  _store_rows(coef_ref, *coef)


def coefficients_fwd(x_TxNC, phi_t_KxNC, alpha_Kx1, bias_Kx1, *, n, num_iters, eps, post_scale,
                     block_sizes, backend_name):
  """Returns `coef (K, T)`, `proj (K, T)` (`phi^T v`) and `rms (1, T)`, all float32.

  K is the padded logit count; rows past `n*n + 2n` of `coef` are unspecified.
  """
  t, width = x_TxNC.shape
  kp = phi_t_KxNC.shape[0]
  bt = common.token_block(t, block_sizes.coef_tokens, backend_name)
  bk = common.feature_block(width, block_sizes.coef_k)
  kernel = functools.partial(
      _fwd_kernel, n=n, num_iters=num_iters, eps=eps, post_scale=post_scale,
      block_k=bk, backend_name=backend_name, loop=block_sizes.use_loops(backend_name))
  full = lambda shape: pl.BlockSpec(shape, lambda i: (0, 0))
  lanes = lambda rows: pl.BlockSpec((rows, bt), lambda i: (0, i))
  cost = common.cost_estimate(
      flops=2 * t * width * (kp + common.SUMSQ_ROWS) + 40 * num_iters * t * n * n,
      transcendentals=t * (n * n + 2 * n),
      bytes_accessed=x_TxNC.size * x_TxNC.dtype.itemsize + phi_t_KxNC.size * 4 + t * (2 * kp + 1) * 4)
  return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(t, bt),),
      in_specs=[pl.BlockSpec((bt, width), lambda i: (i, 0)), full((kp, width)), full((kp, 1)),
                full((kp, 1))],
      out_specs=[lanes(kp), lanes(kp), lanes(1)],
      out_shape=[jax.ShapeDtypeStruct((kp, t), jnp.float32)] * 2
      + [jax.ShapeDtypeStruct((1, t), jnp.float32)],
      compiler_params=common.compiler_params(backend_name, 1, common.coefficients_bytes(
          n, width // n, x_TxNC.dtype.itemsize, block_sizes, backend_name, num_iters)),
      interpret=backend_name == "interpret",
      cost_estimate=cost,
      name="mhc_coefficients_fwd",
  )(x_TxNC, phi_t_KxNC, alpha_Kx1, bias_Kx1)


def _bwd_kernel(proj_ref, rms_ref, g_ref, alpha_ref, bias_ref, dh_ref, *, n, num_iters, eps,
                post_scale, loop):
  pre, post, res = _logit_rows(proj_ref, rms_ref[...], alpha_ref, bias_ref, n)
  g_pre, g_post = common.load_rows(g_ref, 0, n), common.load_rows(g_ref, n, n)
  g_res = [common.load_rows(g_ref, 2 * n + i * n, n) for i in range(n)]
  d_pre, d_post, d_res = sinkhorn.coefficients_vjp_rows(
      pre, post, res, g_pre, g_post, g_res, num_iters=num_iters, eps=eps, post_scale=post_scale,
      loop=loop)
  _store_rows(dh_ref, d_pre, d_post, d_res)


def coefficients_bwd(proj_KxT, rms_1xT, g_KxT, alpha_Kx1, bias_Kx1, *, n, num_iters, eps,
                     post_scale, block_sizes, backend_name):
  """d(logits) `(K, T)` float32 (rows past `n*n + 2n` unspecified) from coefficient cotangents."""
  kp, t = proj_KxT.shape
  bt = common.token_block(t, block_sizes.coef_tokens, backend_name)
  lanes = lambda rows: pl.BlockSpec((rows, bt), lambda i: (0, i))
  full = pl.BlockSpec((kp, 1), lambda i: (0, 0))
  return pl.pallas_call(
      functools.partial(_bwd_kernel, n=n, num_iters=num_iters, eps=eps,
                        post_scale=post_scale, loop=block_sizes.use_loops(backend_name)),
      grid=(pl.cdiv(t, bt),),
      in_specs=[lanes(kp), lanes(1), lanes(kp), full, full],
      out_specs=lanes(kp),
      out_shape=jax.ShapeDtypeStruct((kp, t), jnp.float32),
      compiler_params=common.compiler_params(
          backend_name, 1, common.sinkhorn_tape_bytes(n, bt, num_iters)),
      interpret=backend_name == "interpret",
      cost_estimate=common.cost_estimate(
          flops=120 * num_iters * t * n * n, transcendentals=2 * t * (n * n + 2 * n),
          bytes_accessed=t * (3 * kp + 1) * 4),
      name="mhc_coefficients_bwd",
  )(proj_KxT, rms_1xT, g_KxT, alpha_Kx1, bias_Kx1)


# ----- the public op and its custom VJP -----

def _streams_count(bias):
  """n from the `n*n + 2n` logits of `bias`."""
  return math.isqrt(bias.shape[-1] + 1) - 1 if bias.ndim == 1 else 0


@functools.partial(jax.jit, static_argnames=STATICS)
def mhc_coefficients(x, phi, alpha, bias, *, num_iters=20, eps=1e-6, post_scale=2.0,
                     token_rows=False, block_sizes=None, bwd_impl="pallas"):
  """Fused `(h_pre (..., n), h_post (..., n), h_res (..., n, n))` float32 from `x (..., n, C)`.

  `token_rows=True`: `x` is `(..., n*C)`, the layout the kernels read without a copy.
  `bwd_impl="xla"` differentiates `coefficients_reference` instead of the backward kernel.
  """
  n = _streams_count(bias)
  if n < 1 or bias.shape != (n * n + 2 * n,):
    raise ValueError(f"mhc_coefficients: bias must have shape (n*n + 2n,) for n streams; got "
                     f"{bias.shape}.")
  lead, c = common.split_streams("mhc_coefficients", x, n, token_rows=token_rows)
  common.check_supported(n, c, block_sizes)
  k = n * n + 2 * n
  for name, arr, want in (("phi", phi, (n * c, k)), ("alpha", alpha, (3,)), ("bias", bias, (k,))):
    if arr.shape != want:
      raise ValueError(f"mhc_coefficients: {name} has shape {arr.shape}, expected {want} for "
                       f"n={n}, C={c}.")
  if bwd_impl not in BWD_IMPLS:
    raise ValueError(f"mhc_coefficients: bwd_impl must be one of {BWD_IMPLS}; got {bwd_impl!r}.")
  if num_iters < 1:
    raise ValueError(f"mhc_coefficients: num_iters must be >= 1; got {num_iters}.")
  common.check_budget(n, c, x.dtype.itemsize, *common.resolve(block_sizes), num_iters)
  return _coefficients(x, phi, alpha, bias, num_iters, eps, post_scale, block_sizes, bwd_impl,
                       lead)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _coefficients(x, phi, alpha, bias, num_iters, eps, post_scale, block_sizes, bwd_impl, lead):
  return _coefficients_fwd(
      x, phi, alpha, bias, num_iters, eps, post_scale, block_sizes, bwd_impl, lead)[0]


def _padded_params(phi, alpha, bias, n, kp):
  k = n * n + 2 * n
  phi_t_KxNC = jnp.pad(phi.astype(jnp.float32).T, ((0, kp - k), (0, 0)))
  alpha_Kx1 = jnp.pad(alpha_per_logit(alpha, n), (0, kp - k))[:, None]
  bias_Kx1 = jnp.pad(bias.astype(jnp.float32), (0, kp - k))[:, None]
  return phi_t_KxNC, alpha_Kx1, bias_Kx1


def _coefficients_fwd(x, phi, alpha, bias, num_iters, eps, post_scale, block_sizes, bwd_impl,
                      lead):
  bs, name = common.resolve(block_sizes)
  n = _streams_count(bias)
  t, k, nc = math.prod(lead), n * n + 2 * n, phi.shape[0]
  phi_t, alpha_k, bias_k = _padded_params(phi, alpha, bias, n, common.padded_logits(k, name))
  coef_KxT, proj_KxT, rms_1xT = coefficients_fwd(
      x.reshape(t, nc), phi_t, alpha_k, bias_k, n=n, num_iters=num_iters, eps=eps,
      post_scale=post_scale, block_sizes=bs, backend_name=name)
  coef_TxK = coef_KxT[:k].T
  out = (coef_TxK[:, :n].reshape(*lead, n), coef_TxK[:, n:2 * n].reshape(*lead, n),
         coef_TxK[:, 2 * n:].reshape(*lead, n, n))
  if bwd_impl == "xla":
    return out, (x, phi, alpha, bias)
  return out, (x, phi, alpha, bias, proj_KxT, rms_1xT)


def _coefficients_bwd(num_iters, eps, post_scale, block_sizes, bwd_impl, lead, res, cts):
  n = _streams_count(res[3])
  c = res[1].shape[0] // n
  if bwd_impl == "xla":
    ref = lambda x, *p: coefficients_reference(
        x.reshape(*lead, n, c), *p, num_iters=num_iters, eps=eps, post_scale=post_scale)
    return jax.vjp(ref, *res)[1](cts)
  x, phi, alpha, bias, proj_KxT, rms_1xT = res
  bs, name = common.resolve(block_sizes)
  t, k = math.prod(lead), n * n + 2 * n
  kp = proj_KxT.shape[0]
  _, alpha_k, bias_k = _padded_params(phi, alpha, bias, n, kp)
  g_pre, g_post, g_res = cts
  g_TxK = jnp.concatenate(
      [g_pre.reshape(t, n), g_post.reshape(t, n), g_res.reshape(t, n * n)], axis=-1)
  dh_KxT = coefficients_bwd(
      proj_KxT, rms_1xT, jnp.pad(g_TxK.astype(jnp.float32).T, ((0, kp - k), (0, 0))), alpha_k,
      bias_k, n=n, num_iters=num_iters, eps=eps, post_scale=post_scale, block_sizes=bs,
      backend_name=name)
  # h = a * proj * rms + b, rms = rsqrt(sum(v**2) / nC + eps): the rest is XLA dots and sums.
  dh_TxK, proj_TxK, rms_Tx1 = dh_KxT[:k].T, proj_KxT[:k].T, rms_1xT[0][:, None]
  a_K = alpha_per_logit(alpha, n)
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
