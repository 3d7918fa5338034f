"""Backward `pallas_call` builders.

The coefficient backward kernel is the "small" backward: per token it rebuilds the logits from
the saved `phi^T v` and rms, recomputes the Sinkhorn iterations on chip and returns d(logits);
the two big contractions (d phi, d x) are XLA dots in `api.py`. The mixing backward kernels
produce d x / d y tile by tile and per-block partial sums of d h, which XLA adds up (no
accumulation across grid steps, so every backend, Triton included, may run them in any order).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import common
from kernels_pallas.fwd import load_col, logit_rows, load_rows, mix_grid, mix_params, store_rows


def _coefficients_bwd_kernel(
    proj_ref, rms_ref, g_ref, alpha_ref, bias_ref, dh_ref, *, n, num_iters, eps, post_scale,
    loop,
):
  pre, post, res = logit_rows(proj_ref, rms_ref[...], alpha_ref, bias_ref, n)
  g_pre, g_post = load_rows(g_ref, 0, n), load_rows(g_ref, n, n)
  g_res = [load_rows(g_ref, 2 * n + i * n, n) for i in range(n)]
  d_pre, d_post, d_res = common.coefficients_vjp_rows(
      pre, post, res, g_pre, g_post, g_res, num_iters=num_iters, eps=eps, post_scale=post_scale,
      loop=loop)
  store_rows(dh_ref, d_pre, d_post, d_res)


def coefficients_bwd(proj_KxT, rms_1xT, g_KxT, alpha_Kx1, bias_Kx1, *, n, num_iters, eps,
                     post_scale, block_sizes, backend_name):
  """d(logits) `(K, T)` float32 (rows past `n*n + 2n` unspecified) from coefficient cotangents."""
  kp, t = proj_KxT.shape
  bt = common.token_block(t, block_sizes.coef_tokens, backend_name)
  lanes = lambda rows: pl.BlockSpec((rows, bt), lambda i: (0, i))
  full = pl.BlockSpec((kp, 1), lambda i: (0, 0))
  return pl.pallas_call(
      functools.partial(_coefficients_bwd_kernel, n=n, num_iters=num_iters, eps=eps,
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


def _columns_tile(cols, width):
  """Assembles `(rows, 1)` columns into a `(rows, width)` tile (zeros past len(cols))."""
  lane = jax.lax.broadcasted_iota(jnp.int32, (cols[0].shape[0], width), 1)
  return common.sum_list([jnp.where(lane == k, col, 0.0) for k, col in enumerate(cols)])


def _column_at(col, k, width):
  """A `(rows, width)` tile holding `col (rows, 1)` at lane k (traced) and zeros elsewhere."""
  lane = jax.lax.broadcasted_iota(jnp.int32, (col.shape[0], width), 1)
  return jnp.where(lane == k, col, 0.0)


def _pre_mix_bwd_kernel(x_ref, h_ref, du_ref, dx_ref, dh_ref):
  """Grid step (tokens, features, s): `dx_s = h_pre[s] du` and `d h_pre[s] = sum_c du x_s`."""
  s = pl.program_id(2)
  du = du_ref[...].astype(jnp.float32)
  dx_ref[...] = (load_col(h_ref[...].astype(jnp.float32), s) * du).astype(dx_ref.dtype)
  dh = jnp.sum(du * x_ref[...].astype(jnp.float32), axis=1, keepdims=True)
  dh_ref[...] = _column_at(dh, s, dh_ref.shape[-1])


def pre_mix_bwd(x_TxNC, h_pre_TxM, du_TxC, *, n, block_sizes, backend_name):
  """Returns `dx (T, n*C)` and partial `dh_pre (C/bc, n, T, M)` (stream s fills column s)."""
  t, c = du_TxC.shape
  m = h_pre_TxM.shape[1]
  grid, specs = mix_grid(t, c, n, block_sizes, backend_name, per_stream=True)
  return pl.pallas_call(
      _pre_mix_bwd_kernel,
      grid=grid,
      in_specs=[specs["grid_stream"], specs["coef"](m), specs["token"]],
      out_specs=[specs["grid_stream"], specs["stream_partial"](m)],
      out_shape=[jax.ShapeDtypeStruct(x_TxNC.shape, x_TxNC.dtype),
                 jax.ShapeDtypeStruct((grid[1], n, t, m), jnp.float32)],
      compiler_params=mix_params(backend_name, True, common.mixing_bytes(
          n, c, x_TxNC.dtype.itemsize, block_sizes, backend_name)),
      interpret=backend_name == "interpret",
      cost_estimate=common.cost_estimate(
          flops=4 * n * t * c, transcendentals=0,
          bytes_accessed=(2 * n + 1) * t * c * x_TxNC.dtype.itemsize),
      name="mhc_pre_mix_bwd",
  )(x_TxNC, h_pre_TxM, du_TxC)


def _post_res_mix_bwd_kernel(*refs, n):
  """Grid step (tokens, features, s): `dx_s`, `d h_res[:, s]`; `dy`, `d h_post` (same every s)."""
  x_ref, y_ref, hp_ref, hr_ref = refs[:4]
  g_refs = refs[4:4 + n]
  dx_ref, dy_ref, dhp_ref, dhr_ref = refs[4 + n:]
  s = pl.program_id(2)
  hp = hp_ref[...].astype(jnp.float32)
  hr = hr_ref[...].astype(jnp.float32)
  y = y_ref[...].astype(jnp.float32)
  xs = x_ref[...].astype(jnp.float32)
  gs = [g[...].astype(jnp.float32) for g in g_refs]
  dy_ref[...] = common.sum_list([load_col(hp, i) * gs[i] for i in range(n)]).astype(dy_ref.dtype)
  dhp_ref[...] = _columns_tile(
      [jnp.sum(gs[i] * y, axis=1, keepdims=True) for i in range(n)], dhp_ref.shape[-1])
  dx_ref[...] = common.sum_list(
      [load_col(hr, i * n + s) * gs[i] for i in range(n)]).astype(dx_ref.dtype)
  dhr_ref[...] = common.sum_list([
      _column_at(jnp.sum(gs[i] * xs, axis=1, keepdims=True), i * n + s, dhr_ref.shape[-1])
      for i in range(n)])


def post_res_mix_bwd(x_TxNC, y_TxC, h_post_TxM, h_res_TxMM, g_TxNC, *, n, block_sizes,
                     backend_name):
  """Returns `dx (T, n*C)`, `dy (T, C)`, partial `dh_post (C/bc, T, M)`, `dh_res (C/bc, n, T, MM)`.

  `dy` and `d h_post` are recomputed (identically) at every stream step s of a block; on TPU their
  blocks stay in VMEM across s and are written back once.
  """
  t, c = y_TxC.shape
  m, mm = h_post_TxM.shape[1], h_res_TxMM.shape[1]
  grid, specs = mix_grid(t, c, n, block_sizes, backend_name, per_stream=True)
  item = x_TxNC.dtype.itemsize
  return pl.pallas_call(
      functools.partial(_post_res_mix_bwd_kernel, n=n),
      grid=grid,
      in_specs=[specs["grid_stream"], specs["token"], specs["coef"](m), specs["coef"](mm)]
      + [specs["stream"](i) for i in range(n)],
      out_specs=[specs["grid_stream"], specs["token"], specs["partial"](m),
                 specs["stream_partial"](mm)],
      out_shape=[jax.ShapeDtypeStruct(x_TxNC.shape, x_TxNC.dtype),
                 jax.ShapeDtypeStruct(y_TxC.shape, y_TxC.dtype),
                 jax.ShapeDtypeStruct((grid[1], t, m), jnp.float32),
                 jax.ShapeDtypeStruct((grid[1], n, t, mm), jnp.float32)],
      compiler_params=mix_params(backend_name, True, common.mixing_bytes(
          n, c, x_TxNC.dtype.itemsize, block_sizes, backend_name)),
      interpret=backend_name == "interpret",
      cost_estimate=common.cost_estimate(
          flops=4 * (n + 1) * n * t * c, transcendentals=0,
          bytes_accessed=(3 * n + 2) * t * c * item),
      name="mhc_post_res_mix_bwd",
  )(x_TxNC, y_TxC, h_post_TxM, h_res_TxMM, *[g_TxNC] * n)
