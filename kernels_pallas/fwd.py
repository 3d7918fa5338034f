"""Forward `pallas_call` builders: fused coefficients, `pre_mix`, fused `post_res_mix`.

Layout (T tokens, already flattened): every kernel sees the streams as `(T, n*C)` token rows;
stream j is the lane range `[j*C, (j+1)*C)` (README: why the model carries them so). Edge blocks
are partial: every output is per token, so the rows past T hold garbage that Pallas never writes
back.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas import common


def load_rows(ref, k, num):
  """Rows `k:k+num` of a ref as float32 (a ref slice: Triton has no value slicing)."""
  return ref[pl.ds(k, num), :].astype(jnp.float32)


def logit_rows(proj_ref, rms, alpha_ref, bias_ref, n):
  """`h = alpha * proj * rms + bias` as `pre (n, bt)`, `post (n, bt)` and n res rows."""
  h = lambda k: load_rows(alpha_ref, k, n) * load_rows(proj_ref, k, n) * rms + load_rows(
      bias_ref, k, n)
  return h(0), h(n), [h(2 * n + i * n) for i in range(n)]


def store_rows(ref, pre, post, res_rows):
  n = pre.shape[0]
  ref[pl.ds(0, n), :] = pre
  ref[pl.ds(n, n), :] = post
  for i, row in enumerate(res_rows):
    ref[pl.ds(2 * n + i * n, n), :] = row


def load_col(tile, k):
  """Column k of a `(rows, m)` value as `(rows, 1)` via a masked lane reduction."""
  lane = jax.lax.broadcasted_iota(jnp.int32, tile.shape, 1)
  return jnp.sum(jnp.where(lane == k, tile, 0.0), axis=1, keepdims=True)


def _coefficients_kernel(
    x_ref, phi_t_ref, alpha_ref, bias_ref, coef_ref, proj_ref, rms_ref, *,
    n, num_iters, eps, post_scale, block_k, backend_name, loop,
):
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
  coef = common.coefficients_from_rows(
      *logit_rows(proj_ref, rms, alpha_ref, bias_ref, n), num_iters=num_iters, eps=eps,
      post_scale=post_scale, loop=loop)
  store_rows(coef_ref, *coef)


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
      _coefficients_kernel, n=n, num_iters=num_iters, eps=eps, post_scale=post_scale,
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


def mix_grid(t, c, n, block_sizes, backend_name, per_stream=False):
  """Grid and block specs shared by the mixing kernels (forward and backward).

  Streams are `(T, n*C)` token rows: stream j of feature block k is the lane-dense block at
  column `j * C/bc + k`, so each stream gets its own BlockSpec over the same array (no strided
  or sub-32-bit sublane loads) and the view is the one the coefficient kernel reads.
  `per_stream=True` adds a last grid axis s over the streams that a kernel writes, one per step;
  blocks that do not depend on s stay in VMEM across it (Mosaic skips the repeated copy).
  """
  bt = common.token_block(t, block_sizes.mix_tokens, backend_name)
  bc = common.feature_block(c, block_sizes.mix_c)
  nb = c // bc
  grid = (pl.cdiv(t, bt), nb) + ((n,) if per_stream else ())
  specs = dict(
      stream=lambda j: pl.BlockSpec((bt, bc), lambda i, k, *_, j=j: (i, j * nb + k)),
      grid_stream=pl.BlockSpec((bt, bc), lambda i, k, s: (i, s * nb + k)),
      token=pl.BlockSpec((bt, bc), lambda i, k, *_: (i, k)),
      coef=lambda m: pl.BlockSpec((bt, m), lambda i, k, *_: (i, 0)),
      partial=lambda m: pl.BlockSpec((None, bt, m), lambda i, k, *_: (k, i, 0)),
      stream_partial=lambda m: pl.BlockSpec((None, None, bt, m), lambda i, k, s: (k, s, i, 0)),
  )
  return grid, specs


def mix_params(backend_name, per_stream, vmem_bytes):
  """Parallel over tokens and feature blocks; the stream axis runs in order (blocks persist)."""
  return common.compiler_params(
      backend_name, 3 if per_stream else 2, vmem_bytes,
      ("parallel", "parallel") + (("arbitrary",) if per_stream else ()))


def _pre_mix_kernel(*refs, n):
  x_refs, (h_ref, u_ref) = refs[:n], refs[n:]
  h = h_ref[...].astype(jnp.float32)
  u = common.sum_list([load_col(h, j) * x_refs[j][...].astype(jnp.float32) for j in range(n)])
  u_ref[...] = u.astype(u_ref.dtype)


def pre_mix_fwd(x_TxNC, h_pre_TxM, *, n, block_sizes, backend_name):
  """`u = sum_j h_pre[j] x_j` -> `(T, C)` in x's dtype."""
  t, c = x_TxNC.shape[0], x_TxNC.shape[1] // n
  grid, specs = mix_grid(t, c, n, block_sizes, backend_name)
  item = x_TxNC.dtype.itemsize
  return pl.pallas_call(
      functools.partial(_pre_mix_kernel, n=n),
      grid=grid,
      in_specs=[specs["stream"](j) for j in range(n)] + [specs["coef"](h_pre_TxM.shape[1])],
      out_specs=specs["token"],
      out_shape=jax.ShapeDtypeStruct((t, c), x_TxNC.dtype),
      compiler_params=mix_params(backend_name, False, common.mixing_bytes(
          n, c, item, block_sizes, backend_name)),
      interpret=backend_name == "interpret",
      cost_estimate=common.cost_estimate(
          flops=2 * n * t * c, transcendentals=0, bytes_accessed=(n + 1) * t * c * item),
      name="mhc_pre_mix_fwd",
  )(*[x_TxNC] * n, h_pre_TxM)


def _post_res_mix_kernel(*refs, n):
  x_refs, (y_ref, hp_ref, hr_ref, o_ref) = refs[:n], refs[n:]
  s = pl.program_id(2)
  hp = hp_ref[...].astype(jnp.float32)
  hr = hr_ref[...].astype(jnp.float32)
  out = common.sum_list([load_col(hp, s) * y_ref[...].astype(jnp.float32)] + [
      load_col(hr, s * n + j) * x_refs[j][...].astype(jnp.float32) for j in range(n)])
  o_ref[...] = out.astype(o_ref.dtype)


def post_res_mix_fwd(x_TxNC, y_TxC, h_post_TxM, h_res_TxMM, *, n, block_sizes, backend_name):
  """`x'_s = sum_j h_res[s, j] x_j + h_post[s] y` -> `(T, n*C)`: reads (n+1)C, writes nC."""
  t, c = y_TxC.shape
  grid, specs = mix_grid(t, c, n, block_sizes, backend_name, per_stream=True)
  return pl.pallas_call(
      functools.partial(_post_res_mix_kernel, n=n),
      grid=grid,
      in_specs=[specs["stream"](j) for j in range(n)] + [
          specs["token"], specs["coef"](h_post_TxM.shape[1]), specs["coef"](h_res_TxMM.shape[1])],
      out_specs=specs["grid_stream"],
      out_shape=jax.ShapeDtypeStruct(x_TxNC.shape, x_TxNC.dtype),
      compiler_params=mix_params(backend_name, True, common.mixing_bytes(
          n, c, x_TxNC.dtype.itemsize, block_sizes, backend_name)),
      interpret=backend_name == "interpret",
      cost_estimate=common.cost_estimate(
          flops=2 * (n + 1) * n * t * c, transcendentals=0,
          bytes_accessed=(2 * n * x_TxNC.dtype.itemsize + y_TxC.dtype.itemsize) * t * c),
      name="mhc_post_res_mix_fwd",
  )(*[x_TxNC] * n, y_TxC, h_post_TxM, h_res_TxMM)
