"""`pre_mix`: `u = sum_j h_pre[j] x_j` (math.md §2), its kernels and custom VJP.

Forward: grid `(token blocks, feature blocks)`, reads the n stream blocks and writes u. Backward:
grid `(token blocks, feature blocks, stream s)` writes `dx_s` and a per-block partial of
`d h_pre[s]` that XLA sums over the feature blocks (no accumulation across grid steps, so every
backend may run the steps in any order). Reference: `mhc_jax.core.streams.pre_mix`.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import common


def _fwd_kernel(*refs, n):
  x_refs, (h_ref, u_ref) = refs[:n], refs[n:]
  h = h_ref[...].astype(jnp.float32)
  u = common.sum_list(
      [common.load_col(h, j) * x_refs[j][...].astype(jnp.float32) for j in range(n)])
  u_ref[...] = u.astype(u_ref.dtype)


def pre_mix_fwd(x_TxNC, h_pre_TxM, *, n, block_sizes, backend_name):
  """`u = sum_j h_pre[j] x_j` -> `(T, C)` in x's dtype."""
  t, c = x_TxNC.shape[0], x_TxNC.shape[1] // n
  grid, specs = common.mix_grid(t, c, n, block_sizes, backend_name)
  item = x_TxNC.dtype.itemsize
  return pl.pallas_call(
      functools.partial(_fwd_kernel, n=n),
      grid=grid,
      in_specs=[specs["stream"](j) for j in range(n)] + [specs["coef"](h_pre_TxM.shape[1])],
      out_specs=specs["token"],
      out_shape=jax.ShapeDtypeStruct((t, c), x_TxNC.dtype),
      compiler_params=common.mix_params(backend_name, False, common.mixing_bytes(
          n, c, item, block_sizes, backend_name)),
      interpret=backend_name == "interpret",
      cost_estimate=common.cost_estimate(
          flops=2 * n * t * c, transcendentals=0, bytes_accessed=(n + 1) * t * c * item),
      name="mhc_pre_mix_fwd",
  )(*[x_TxNC] * n, h_pre_TxM)


def _bwd_kernel(x_ref, h_ref, du_ref, dx_ref, dh_ref):
  """Grid step (tokens, features, s): `dx_s = h_pre[s] du` and `d h_pre[s] = sum_c du x_s`."""
  s = pl.program_id(2)
  du = du_ref[...].astype(jnp.float32)
  dx_ref[...] = (common.load_col(h_ref[...].astype(jnp.float32), s) * du).astype(dx_ref.dtype)
  dh = jnp.sum(du * x_ref[...].astype(jnp.float32), axis=1, keepdims=True)
  dh_ref[...] = common.column_at(dh, s, dh_ref.shape[-1])


def pre_mix_bwd(x_TxNC, h_pre_TxM, du_TxC, *, n, block_sizes, backend_name):
  """Returns `dx (T, n*C)` and partial `dh_pre (C/bc, n, T, M)` (stream s fills column s)."""
  t, c = du_TxC.shape
  m = h_pre_TxM.shape[1]
  grid, specs = common.mix_grid(t, c, n, block_sizes, backend_name, per_stream=True)
  return pl.pallas_call(
      _bwd_kernel,
      grid=grid,
      in_specs=[specs["grid_stream"], specs["coef"](m), specs["token"]],
      out_specs=[specs["grid_stream"], specs["stream_partial"](m)],
      out_shape=[jax.ShapeDtypeStruct(x_TxNC.shape, x_TxNC.dtype),
                 jax.ShapeDtypeStruct((grid[1], n, t, m), jnp.float32)],
      compiler_params=common.mix_params(backend_name, True, common.mixing_bytes(
          n, c, x_TxNC.dtype.itemsize, block_sizes, backend_name)),
      interpret=backend_name == "interpret",
      cost_estimate=common.cost_estimate(
          flops=4 * n * t * c, transcendentals=0,
          bytes_accessed=(2 * n + 1) * t * c * x_TxNC.dtype.itemsize),
      name="mhc_pre_mix_bwd",
  )(x_TxNC, h_pre_TxM, du_TxC)


@functools.partial(jax.jit, static_argnames=("token_rows", "block_sizes"))
def pre_mix(x, h_pre, *, token_rows=False, block_sizes=None):
  """`(..., n, C)` streams (or `(..., n*C)` token rows) and `h_pre (..., n)` -> `u (..., C)`."""
  n = h_pre.shape[-1]
  lead, c = common.split_streams("pre_mix", x, n, token_rows=token_rows)
  common.check_supported(n, c, block_sizes)
  common.check_shapes("pre_mix", x, lead, n, c, ("h_pre", h_pre, (n,)))
  common.check_budget(n, c, x.dtype.itemsize, *common.resolve(block_sizes))
  return _pre_mix(x, h_pre, block_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pre_mix(x, h_pre, block_sizes):
  return _pre_mix_fwd(x, h_pre, block_sizes)[0]


def _pre_mix_fwd(x, h_pre, block_sizes):
  bs, name = common.resolve(block_sizes)
  lead, n = h_pre.shape[:-1], h_pre.shape[-1]
  t = math.prod(lead)
  c = x.size // (t * n)
  u = pre_mix_fwd(x.reshape(t, n * c), common.coef_cols(h_pre, t, n), n=n, block_sizes=bs,
                  backend_name=name)
  return u.reshape(*lead, c), (x, h_pre)


def _pre_mix_bwd(block_sizes, res, du):
  x, h_pre = res
  bs, name = common.resolve(block_sizes)
  lead, n = h_pre.shape[:-1], h_pre.shape[-1]
  t, c = math.prod(lead), du.shape[-1]
  dx, dh_parts = pre_mix_bwd(
      x.reshape(t, n * c), common.coef_cols(h_pre, t, n), du.reshape(t, c).astype(x.dtype), n=n,
      block_sizes=bs, backend_name=name)
  dh = jnp.sum(dh_parts, axis=(0, 1))[:, :n].reshape(h_pre.shape)
  return dx.reshape(x.shape), dh.astype(h_pre.dtype)


_pre_mix.defvjp(_pre_mix_fwd, _pre_mix_bwd)
