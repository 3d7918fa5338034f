"""Forward `pallas_call` builders: fused coefficients, `pre_mix`, fused `post_res_mix`.

Layouts (T tokens, already flattened): streams as `(T, n*C)` for the coefficient kernel and as
`(T*n, C)` (token-major, stream-minor rows) for the mixing kernels, which read stream `j` of a
token block with a stride-n row slice. Edge blocks are partial: every output is per token, so
the rows past T hold garbage that Pallas never writes back.
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
    n, num_iters, eps, post_scale, block_k, backend_name,
):
  """One token block: `proj = phi^T v`, `sum(v**2)` in one pass, then the coefficient math."""
  bt, width = x_ref.shape
  proj = jnp.zeros((phi_t_ref.shape[0], bt), jnp.float32)
  sumsq = jnp.zeros((common.SUMSQ_ROWS, bt), jnp.float32)
  ones = jnp.ones((common.SUMSQ_ROWS, block_k), jnp.float32)
  for c in range(width // block_k):
    cols = pl.ds(c * block_k, block_k)
    v = x_ref[:, cols].astype(jnp.float32)
    proj += common.dot_nt(phi_t_ref[:, cols].astype(jnp.float32), v)
    sumsq += common.dot_nt(ones, v * v)  # every row holds sum(v**2), lane-dense
  rms = jax.lax.rsqrt(jnp.max(sumsq, axis=0, keepdims=True) / width + eps)
  proj_ref[...] = proj
  rms_ref[...] = rms
  if backend_name == "gpu":
    pltriton.debug_barrier()  # rows are read back by other threads of the program
  coef = common.coefficients_from_rows(
      *logit_rows(proj_ref, rms, alpha_ref, bias_ref, n), num_iters=num_iters, eps=eps,
      post_scale=post_scale)
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
      block_k=bk, backend_name=backend_name)
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
      compiler_params=common.compiler_params(backend_name, 1),
      interpret=backend_name == "interpret",
      cost_estimate=cost,
      name="mhc_coefficients_fwd",
  )(x_TxNC, phi_t_KxNC, alpha_Kx1, bias_Kx1)


def stream_rows(ref, j, n, bt):
  """Stream j of a `(bt*n, c)` block of token-major, stream-minor rows, as float32 `(bt, c)`."""
  return ref[pl.ds(j, bt, stride=n), :].astype(jnp.float32)


def mix_grid(t, c, n, block_sizes, backend_name):
  """Grid and block specs shared by the mixing kernels (forward and backward)."""
  bt = common.token_block(t, block_sizes.mix_tokens, backend_name)
  bc = common.feature_block(c, block_sizes.mix_c)
  specs = dict(
      streams=pl.BlockSpec((bt * n, bc), lambda i, j: (i, j)),
      token=pl.BlockSpec((bt, bc), lambda i, j: (i, j)),
      coef=lambda m: pl.BlockSpec((bt, m), lambda i, j: (i, 0)),
      partial=lambda m: pl.BlockSpec((None, bt, m), lambda i, j: (j, i, 0)),
  )
  return (pl.cdiv(t, bt), c // bc), specs


def _pre_mix_kernel(x_ref, h_ref, u_ref, *, n):
  bt = u_ref.shape[0]
  h = h_ref[...].astype(jnp.float32)
  u = common.sum_list([load_col(h, j) * stream_rows(x_ref, j, n, bt) for j in range(n)])
  u_ref[...] = u.astype(u_ref.dtype)


def pre_mix_fwd(x_TNxC, h_pre_TxM, *, n, block_sizes, backend_name):
  """`u = sum_j h_pre[j] x_j` -> `(T, C)` in x's dtype."""
  c = x_TNxC.shape[1]
  t = x_TNxC.shape[0] // n
  grid, specs = mix_grid(t, c, n, block_sizes, backend_name)
  item = x_TNxC.dtype.itemsize
  return pl.pallas_call(
      functools.partial(_pre_mix_kernel, n=n),
      grid=grid,
      in_specs=[specs["streams"], specs["coef"](h_pre_TxM.shape[1])],
      out_specs=specs["token"],
      out_shape=jax.ShapeDtypeStruct((t, c), x_TNxC.dtype),
      compiler_params=common.compiler_params(backend_name, 2),
      interpret=backend_name == "interpret",
      cost_estimate=common.cost_estimate(
          flops=2 * n * t * c, transcendentals=0, bytes_accessed=(n + 1) * t * c * item),
      name="mhc_pre_mix_fwd",
  )(x_TNxC, h_pre_TxM)


def _post_res_mix_kernel(x_ref, y_ref, hp_ref, hr_ref, o_ref, *, n):
  bt = y_ref.shape[0]
  hp = hp_ref[...].astype(jnp.float32)
  hr = hr_ref[...].astype(jnp.float32)
  xs = [stream_rows(x_ref, j, n, bt) for j in range(n)]
  y = y_ref[...].astype(jnp.float32)
  for i in range(n):
    out = common.sum_list([load_col(hp, i) * y] + [load_col(hr, i * n + j) * xs[j] for j in range(n)])
    o_ref[pl.ds(i, bt, stride=n), :] = out.astype(o_ref.dtype)


def post_res_mix_fwd(x_TNxC, y_TxC, h_post_TxM, h_res_TxMM, *, n, block_sizes, backend_name):
  """`x'_i = sum_j h_res[i, j] x_j + h_post[i] y` -> `(T*n, C)`: reads (n+1)C, writes nC."""
  c = x_TNxC.shape[1]
  t = y_TxC.shape[0]
  grid, specs = mix_grid(t, c, n, block_sizes, backend_name)
  return pl.pallas_call(
      functools.partial(_post_res_mix_kernel, n=n),
      grid=grid,
      in_specs=[specs["streams"], specs["token"], specs["coef"](h_post_TxM.shape[1]),
                specs["coef"](h_res_TxMM.shape[1])],
      out_specs=specs["streams"],
      out_shape=jax.ShapeDtypeStruct(x_TNxC.shape, x_TNxC.dtype),
      compiler_params=common.compiler_params(backend_name, 2),
      interpret=backend_name == "interpret",
      cost_estimate=common.cost_estimate(
          flops=2 * (n + 1) * n * t * c, transcendentals=0,
          bytes_accessed=(2 * n * x_TNxC.dtype.itemsize + y_TxC.dtype.itemsize) * t * c),
      name="mhc_post_res_mix_fwd",
  )(x_TNxC, y_TxC, h_post_TxM, h_res_TxMM)
