"""Grouped matmul of rows sorted by group: `ragged_dot`, or the megablox Pallas kernels on TPU.

`grouped_matmul(x_AxK, w_GxKxN, sizes_G)` multiplies the first `sizes_G[0]` rows of `x` by
`w[0]`, the next `sizes_G[1]` rows by `w[1]`, and so on; rows past `sum(sizes_G)` come out as
zeros. Two implementations, equal forward and backward:

- `ragged_dot`: `jax.lax.ragged_dot`, lowered by XLA on every backend. On XLA:TPU its weight
  gradient is lowered densely over the groups: `G` times the FLOPs of the routed rows.
- `megablox`: the grouped-matmul kernels that ship with JAX for TPU
  (`jax.experimental.pallas.ops.tpu.megablox`): `gmm` forward and input gradient, `tgmm` weight
  gradient, each visiting only the row tiles of the groups they hold. TPU only; `interpret=True`
  runs it on CPU for the tests.

`mhc_jax.parallel.platform.moe_impl` resolves `model.moe_impl='auto'` for the devices of the
step: megablox on TPU when the matrix dims are multiples of 128 (megablox tiles them).
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import megablox

LANES = 128
# megablox tile caps. At (1024, 1024, 1024) the kernels and their backward fit the default scoped
# VMEM of v5e, v5p and v6e (the next step, N 2048, overflows v5e's); larger tiles re-read less:
# benchmarks/grouped_matmul.py.
_ROW_TILE = 1024  # rows per tile (fewer when there are fewer rows)
_K_TILE = 1024  # the largest contraction tile tried (a multiple of 128 dividing K)
_N_TILE = 1024  # the largest output-column tile tried (a multiple of 128 dividing N)


def _lane_tile(dim: int, cap: int) -> int:
  """The largest multiple of 128 up to `cap` that divides `dim`, else `dim` (one whole tile)."""
  for tile in range(cap, 127, -128):
    if dim % tile == 0:
      return tile
  return dim


def _megablox(x_AxK, w_GxKxN, sizes_G, interpret: bool):
  """megablox `gmm` with the rows padded to whole tiles. The padding rows and any rows past
  `sum(sizes_G)` form one extra group that has no weights: megablox leaves it to zeros."""
  a, k = x_AxK.shape
  if not interpret and (k % LANES or w_GxKxN.shape[2] % LANES):
    raise ValueError(
        f"model.moe_impl='megablox' needs d_model and expert_dim to be multiples of {LANES} on "
        f"TPU (got a {k} x {w_GxKxN.shape[2]} expert matrix); use model.moe_impl='auto'.")
  tm = min(_ROW_TILE, -(-a // 8) * 8)
  padded = -(-a // tm) * tm
  x_PxK = jnp.pad(x_AxK, ((0, padded - a), (0, 0)))
  rest = padded - jnp.sum(sizes_G)
  sizes_G1 = jnp.concatenate([sizes_G.astype(jnp.int32), rest[None].astype(jnp.int32)])
  tiling = (tm, _lane_tile(k, _K_TILE), _lane_tile(w_GxKxN.shape[2], _N_TILE))
  y_PxN = megablox.gmm(x_PxK, w_GxKxN, sizes_G1, x_AxK.dtype, tiling, None, None, False,
                       interpret)
  return y_PxN[:a]


def grouped_matmul(x_AxK: jax.Array, w_GxKxN: jax.Array, sizes_G: jax.Array, *,
                   impl: str = "ragged_dot", interpret: bool = False) -> jax.Array:
  """`(A, N)`: rows of `x` times their group's `w`, zeros past `sum(sizes_G)`; `impl` as above."""
  if impl == "megablox":
    return _megablox(x_AxK, w_GxKxN.astype(x_AxK.dtype), sizes_G, interpret)
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(x_AxK, w_GxKxN.astype(x_AxK.dtype), sizes_G)
  raise ValueError(f"grouped_matmul impl={impl!r}; choose 'ragged_dot' or 'megablox'.")
