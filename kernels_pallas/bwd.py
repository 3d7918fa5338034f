"""Backward `pallas_call` builders.

The coefficient backward kernel is the "small" backward: per token it rebuilds the logits from
the saved `phi^T v` and rms, recomputes the Sinkhorn iterations on chip and returns d(logits);
the two big contractions (d phi, d x) are XLA dots in `api.py`. The mixing backward kernels
produce d x / d y tile by tile and per-feature-block partial sums of d h, which XLA adds up
(no cross-block accumulation, so the grid stays parallel on every backend).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import common
from kernels_pallas.fwd import load_col, logit_rows, load_rows, mix_grid, store_rows, stream_rows


def _coefficients_bwd_kernel(
    proj_ref, rms_ref, g_ref, alpha_ref, bias_ref, dh_ref, *, n, num_iters, eps, post_scale,
):
  pre, post, res = logit_rows(proj_ref, rms_ref[...], alpha_ref, bias_ref, n)
  g_pre, g_post = load_rows(g_ref, 0, n), load_rows(g_ref, n, n)
  g_res = [load_rows(g_ref, 2 * n + i * n, n) for i in range(n)]
  d_pre, d_post, d_res = common.coefficients_vjp_rows(
      pre, post, res, g_pre, g_post, g_res, num_iters=num_iters, eps=eps, post_scale=post_scale)
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
                        post_scale=post_scale),
      grid=(pl.cdiv(t, bt),),
      in_specs=[lanes(kp), lanes(1), lanes(kp), full, full],
      out_specs=lanes(kp),
      out_shape=jax.ShapeDtypeStruct((kp, t), jnp.float32),
      compiler_params=common.compiler_params(backend_name, 1),
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


def _pre_mix_bwd_kernel(x_ref, h_ref, du_ref, dx_ref, dh_ref, *, n):
  bt = du_ref.shape[0]
  h = h_ref[...].astype(jnp.float32)
  du = du_ref[...].astype(jnp.float32)
  dh = []
  for j in range(n):
    dx_ref[pl.ds(j, bt, stride=n), :] = (load_col(h, j) * du).astype(dx_ref.dtype)
    dh.append(jnp.sum(du * stream_rows(x_ref, j, n, bt), axis=1, keepdims=True))
  dh_ref[...] = _columns_tile(dh, dh_ref.shape[-1])


def pre_mix_bwd(x_TNxC, h_pre_TxM, du_TxC, *, n, block_sizes, backend_name):
  """Returns `dx (T*n, C)` and per-feature-block partial `dh_pre (C/bc, T, M)`."""
  t, c = du_TxC.shape
  m = h_pre_TxM.shape[1]
  grid, specs = mix_grid(t, c, n, block_sizes, backend_name)
  return pl.pallas_call(
      functools.partial(_pre_mix_bwd_kernel, n=n),
      grid=grid,
      in_specs=[specs["streams"], specs["coef"](m), specs["token"]],
      out_specs=[specs["streams"], specs["partial"](m)],
      out_shape=[jax.ShapeDtypeStruct(x_TNxC.shape, x_TNxC.dtype),
                 jax.ShapeDtypeStruct((grid[1], t, m), jnp.float32)],
      compiler_params=common.compiler_params(backend_name, 2),
      interpret=backend_name == "interpret",
      cost_estimate=common.cost_estimate(
          flops=4 * n * t * c, transcendentals=0,
          bytes_accessed=(2 * n + 1) * t * c * x_TNxC.dtype.itemsize),
      name="mhc_pre_mix_bwd",
  )(x_TNxC, h_pre_TxM, du_TxC)


def _post_res_mix_bwd_kernel(x_ref, y_ref, hp_ref, hr_ref, g_ref, dx_ref, dy_ref, dhp_ref,
                             dhr_ref, *, n):
  bt = y_ref.shape[0]
  hp = hp_ref[...].astype(jnp.float32)
  hr = hr_ref[...].astype(jnp.float32)
  y = y_ref[...].astype(jnp.float32)
  gs = [stream_rows(g_ref, i, n, bt) for i in range(n)]
  dy_ref[...] = common.sum_list([load_col(hp, i) * gs[i] for i in range(n)]).astype(dy_ref.dtype)
  dhp_ref[...] = _columns_tile(
      [jnp.sum(gs[i] * y, axis=1, keepdims=True) for i in range(n)], dhp_ref.shape[-1])
  dhr = [None] * (n * n)
  for j in range(n):
    xj = stream_rows(x_ref, j, n, bt)
    dxj = common.sum_list([load_col(hr, i * n + j) * gs[i] for i in range(n)])
    dx_ref[pl.ds(j, bt, stride=n), :] = dxj.astype(dx_ref.dtype)
    for i in range(n):
      dhr[i * n + j] = jnp.sum(gs[i] * xj, axis=1, keepdims=True)
  dhr_ref[...] = _columns_tile(dhr, dhr_ref.shape[-1])


def post_res_mix_bwd(x_TNxC, y_TxC, h_post_TxM, h_res_TxMM, g_TNxC, *, n, block_sizes,
                     backend_name):
  """Returns `dx (T*n, C)`, `dy (T, C)` and partial `dh_post (C/bc, T, M)`, `dh_res (C/bc, T, MM)`."""
  t, c = y_TxC.shape
  m, mm = h_post_TxM.shape[1], h_res_TxMM.shape[1]
  grid, specs = mix_grid(t, c, n, block_sizes, backend_name)
  item = x_TNxC.dtype.itemsize
  return pl.pallas_call(
      functools.partial(_post_res_mix_bwd_kernel, n=n),
      grid=grid,
      in_specs=[specs["streams"], specs["token"], specs["coef"](m), specs["coef"](mm),
                specs["streams"]],
      out_specs=[specs["streams"], specs["token"], specs["partial"](m), specs["partial"](mm)],
      out_shape=[jax.ShapeDtypeStruct(x_TNxC.shape, x_TNxC.dtype),
                 jax.ShapeDtypeStruct(y_TxC.shape, y_TxC.dtype),
                 jax.ShapeDtypeStruct((grid[1], t, m), jnp.float32),
                 jax.ShapeDtypeStruct((grid[1], t, mm), jnp.float32)],
      compiler_params=common.compiler_params(backend_name, 2),
      interpret=backend_name == "interpret",
      cost_estimate=common.cost_estimate(
          flops=4 * (n + 1) * n * t * c, transcendentals=0,
          bytes_accessed=(3 * n + 2) * t * c * item),
      name="mhc_post_res_mix_bwd",
  )(x_TNxC, y_TxC, h_post_TxM, h_res_TxMM, g_TNxC)
