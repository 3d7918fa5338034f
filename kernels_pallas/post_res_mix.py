"""Fused `post_res_mix`: `x'_s = sum_j h_res[s, j] x_j + h_post[s] y` (math.md §2), its kernels
and custom VJP. Reads `(n+1) C` and writes `n C` per token.

Grid `(token blocks, feature blocks, output stream s)`: one output stream per step of the last
axis; the blocks that do not depend on s (the n inputs, y) stay on chip across it, so each
stream is still read once. The backward writes `dx_s` and partials of `d h_res[:, s]` per step,
and `dy`, `d h_post`, recomputed identically at every s (written back once on TPU). Reference:
`mhc_jax.core.streams.post_res_mix`.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import common


def _fwd_kernel(*refs, n):
  x_refs, (y_ref, hp_ref, hr_ref, o_ref) = refs[:n], refs[n:]
  s = pl.program_id(2)
  hp = hp_ref[...].astype(jnp.float32)
  hr = hr_ref[...].astype(jnp.float32)
  out = common.sum_list([common.load_col(hp, s) * y_ref[...].astype(jnp.float32)] + [
      common.load_col(hr, s * n + j) * x_refs[j][...].astype(jnp.float32) for j in range(n)])
  o_ref[...] = out.astype(o_ref.dtype)


def post_res_mix_fwd(x_TxNC, y_TxC, h_post_TxM, h_res_TxMM, *, n, block_sizes, backend_name):
  """`x'_s = sum_j h_res[s, j] x_j + h_post[s] y` -> `(T, n*C)`: reads (n+1)C, writes nC."""
  t, c = y_TxC.shape
  grid, specs = common.mix_grid(t, c, n, block_sizes, backend_name, per_stream=True)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, n=n),
      grid=grid,
      in_specs=[specs["stream"](j) for j in range(n)] + [
          specs["token"], specs["coef"](h_post_TxM.shape[1]), specs["coef"](h_res_TxMM.shape[1])],
      out_specs=specs["grid_stream"],
      out_shape=jax.ShapeDtypeStruct(x_TxNC.shape, x_TxNC.dtype),
      compiler_params=common.mix_params(backend_name, True, common.mixing_bytes(
          n, c, x_TxNC.dtype.itemsize, block_sizes, backend_name)),
      interpret=backend_name == "interpret",
      cost_estimate=common.cost_estimate(
          flops=2 * (n + 1) * n * t * c, transcendentals=0,
          bytes_accessed=(2 * n * x_TxNC.dtype.itemsize + y_TxC.dtype.itemsize) * t * c),
      name="mhc_post_res_mix_fwd",
  )(*[x_TxNC] * n, y_TxC, h_post_TxM, h_res_TxMM)


def _bwd_kernel(*refs, n):
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
  dy_ref[...] = common.sum_list(
      [common.load_col(hp, i) * gs[i] for i in range(n)]).astype(dy_ref.dtype)
  dhp_ref[...] = common.columns_tile(
      [jnp.sum(gs[i] * y, axis=1, keepdims=True) for i in range(n)], dhp_ref.shape[-1])
  dx_ref[...] = common.sum_list(
      [common.load_col(hr, i * n + s) * gs[i] for i in range(n)]).astype(dx_ref.dtype)
  dhr_ref[...] = common.sum_list([
      common.column_at(jnp.sum(gs[i] * xs, axis=1, keepdims=True), i * n + s, dhr_ref.shape[-1])
      for i in range(n)])


def post_res_mix_bwd(x_TxNC, y_TxC, h_post_TxM, h_res_TxMM, g_TxNC, *, n, block_sizes,
                     backend_name):
  """Returns `dx (T, n*C)`, `dy (T, C)`, partial `dh_post (C/bc, T, M)`, `dh_res (C/bc, n, T, MM)`."""
  t, c = y_TxC.shape
  m, mm = h_post_TxM.shape[1], h_res_TxMM.shape[1]
  grid, specs = common.mix_grid(t, c, n, block_sizes, backend_name, per_stream=True)
  item = x_TxNC.dtype.itemsize
  return pl.pallas_call(
      functools.partial(_bwd_kernel, n=n),
      grid=grid,
      in_specs=[specs["grid_stream"], specs["token"], specs["coef"](m), specs["coef"](mm)]
      + [specs["stream"](i) for i in range(n)],
      out_specs=[specs["grid_stream"], specs["token"], specs["partial"](m),
                 specs["stream_partial"](mm)],
      out_shape=[jax.ShapeDtypeStruct(x_TxNC.shape, x_TxNC.dtype),
                 jax.ShapeDtypeStruct(y_TxC.shape, y_TxC.dtype),
                 jax.ShapeDtypeStruct((grid[1], t, m), jnp.float32),
                 jax.ShapeDtypeStruct((grid[1], n, t, mm), jnp.float32)],
      compiler_params=common.mix_params(backend_name, True, common.mixing_bytes(
          n, c, x_TxNC.dtype.itemsize, block_sizes, backend_name)),
      interpret=backend_name == "interpret",
      cost_estimate=common.cost_estimate(
          flops=4 * (n + 1) * n * t * c, transcendentals=0,
          bytes_accessed=(3 * n + 2) * t * c * item),
      name="mhc_post_res_mix_bwd",
  )(x_TxNC, y_TxC, h_post_TxM, h_res_TxMM, *[g_TxNC] * n)


@functools.partial(jax.jit, static_argnames=("token_rows", "block_sizes"))
def post_res_mix(x, y, h_post, h_res, *, token_rows=False, block_sizes=None):
  """Streams `(..., n, C)` (or token rows `(..., n*C)`), `y (..., C)`, `h_post (..., n)`,
  `h_res (..., n, n)` -> the new streams, in x's shape and dtype."""
  n = h_post.shape[-1]
  lead, c = common.split_streams("post_res_mix", x, n, token_rows=token_rows)
  common.check_supported(n, c, block_sizes)
  common.check_shapes("post_res_mix", x, lead, n, c, ("y", y, (c,)), ("h_post", h_post, (n,)),
                      ("h_res", h_res, (n, n)))
  common.check_budget(n, c, x.dtype.itemsize, *common.resolve(block_sizes))
  return _post_res_mix(x, y, h_post, h_res, block_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _post_res_mix(x, y, h_post, h_res, block_sizes):
  return _post_res_mix_fwd(x, y, h_post, h_res, block_sizes)[0]


def _post_res_mix_fwd(x, y, h_post, h_res, block_sizes):
  bs, name = common.resolve(block_sizes)
  lead, (n, c) = y.shape[:-1], (h_post.shape[-1], y.shape[-1])
  t = math.prod(lead)
  out = post_res_mix_fwd(
      x.reshape(t, n * c), y.reshape(t, c), common.coef_cols(h_post, t, n),
      common.coef_cols(h_res, t, n * n), n=n, block_sizes=bs, backend_name=name)
  return out.reshape(x.shape), (x, y, h_post, h_res)


def _post_res_mix_bwd(block_sizes, res, g):
  x, y, h_post, h_res = res
  bs, name = common.resolve(block_sizes)
  lead, (n, c) = y.shape[:-1], (h_post.shape[-1], y.shape[-1])
  t = math.prod(lead)
  dx, dy, dhp_parts, dhr_parts = post_res_mix_bwd(
      x.reshape(t, n * c), y.reshape(t, c), common.coef_cols(h_post, t, n),
      common.coef_cols(h_res, t, n * n), g.reshape(t, n * c).astype(x.dtype), n=n,
      block_sizes=bs, backend_name=name)
  dh_post = jnp.sum(dhp_parts, axis=0)[:, :n].reshape(h_post.shape)
  dh_res = jnp.sum(dhr_parts, axis=(0, 1))[:, :n * n].reshape(h_res.shape)
  return (dx.reshape(x.shape), dy.reshape(y.shape), dh_post.astype(h_post.dtype),
          dh_res.astype(h_res.dtype))


_post_res_mix.defvjp(_post_res_mix_fwd, _post_res_mix_bwd)
