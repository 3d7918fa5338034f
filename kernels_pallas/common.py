"""What every mHC kernel shares: `BlockSizes`, the backend, on-chip budgets, block helpers.

Every kernel sees the streams as token rows `(T, n*C)`: stream j of a token block is the lane
range `[j*C, (j+1)*C)` (README.md: why). `mix_grid` gives the mixing kernels' grid and specs.
"""

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton


LANES = 128  # C and every lane-axis block must be a multiple of this.
SUMSQ_ROWS = 16  # rows of the ones-matrix that turns sum(v**2) into a lane-dense matmul.
BACKENDS = ("interpret", "tpu", "gpu")


def _is_pow2(v: int) -> bool:
  return v > 0 and v & (v - 1) == 0


def next_pow2(v: int) -> int:
  return 1 << max(v - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Block sizes of the mHC kernels and where they run.

  interpret: None means interpret mode exactly on CPU. backend: None picks from the default JAX
  backend; "tpu" / "gpu" force a lowering (how the tests lower for TPU and CUDA on a CPU host).

  coef_tokens: tokens per block of the coefficient kernels (a lane axis there).
  coef_k: width of the chunks of the `n*C` row that are contracted with phi one at a time.
  mix_tokens, mix_c: token and feature block of the pre/post mixing kernels.
  All are powers of two (Triton needs it); lane-axis sizes are multiples of 128.
  loops: run the coefficient kernels' chunk and Sinkhorn loops as loops (None: on GPU only,
  where Triton takes minutes on unrolled code; Mosaic wants the static lane slices of unrolled
  chunks).
  """
  coef_tokens: int = 128
  coef_k: int = 512
  mix_tokens: int = 128
  mix_c: int = 512
  interpret: bool | None = None
  backend: str | None = None
  loops: bool | None = None

  def use_loops(self, backend_name: str) -> bool:
    return backend_name == "gpu" if self.loops is None else self.loops

  def __post_init__(self):
    if self.backend not in (None, *BACKENDS):
      raise ValueError(f"BlockSizes.backend={self.backend!r} must be None or one of {BACKENDS}.")
    for name in ("coef_tokens", "coef_k", "mix_c"):
      v = getattr(self, name)
      if not (_is_pow2(v) and v % LANES == 0):
        raise ValueError(
            f"BlockSizes.{name}={v} must be a power of two and a multiple of {LANES}; "
            f"try {max(LANES, next_pow2(v))}.")
    if not (_is_pow2(self.mix_tokens) and self.mix_tokens >= 16):
      raise ValueError(
          f"BlockSizes.mix_tokens={self.mix_tokens} must be a power of two >= 16; "
          f"try {max(16, next_pow2(self.mix_tokens))}.")

  @classmethod
  def for_backend(cls, backend_name: str, **kwargs) -> "BlockSizes":
    """Defaults per backend: big VMEM tiles on TPU, register-sized programs on GPU."""
    if backend_name == "gpu":
      return cls(coef_tokens=128, coef_k=128, mix_tokens=16, mix_c=256, **kwargs)
    return cls(**kwargs)


def backend_for_platform(platform: str) -> str:
  """Kernel backend for devices of `platform` ('cpu' -> interpret, 'tpu', 'gpu'/'cuda' -> gpu)."""
  return {"cpu": "interpret", "tpu": "tpu"}.get(platform, "gpu")


def backend(block_sizes: BlockSizes | None = None) -> str:
  """'interpret' on CPU (or when asked), else 'tpu' or 'gpu'; `block_sizes.backend` overrides.

  Without an override this follows the host's default backend. A build for other devices (a
  compile-only TPU from a CPU host) must say so: `mhc_jax.parallel.platform` sets it from the
  mesh.
  """
  if block_sizes is not None and block_sizes.backend is not None:
    return block_sizes.backend
  if block_sizes is not None and block_sizes.interpret:
    return "interpret"
  return backend_for_platform(jax.default_backend())


# On-chip memory per kernel instance. TPU: VMEM we allow a kernel (v5e and v6e have 128 MiB,
# v5p 95 MiB) and the scoped default XLA gives one unless told (16 MiB). GPU: the H100's opt-in
# shared memory per block (227 KiB), what Triton's tiles of a `dot` must fit in.
BUDGET_BYTES = {"tpu": 64 * 2**20, "gpu": 232_448}
TPU_SCOPED_DEFAULT = 16 * 2**20


def coefficients_bytes(n, c, itemsize, bs: BlockSizes, backend_name: str, num_iters: int) -> int:
  """On-chip bytes of the coefficient kernels' blocks (both directions; the forward dominates)."""
  kp, width, bt = padded_logits(n * n + 2 * n, backend_name), n * c, bs.coef_tokens
  bk = feature_block(width, bs.coef_k)
  if backend_name == "gpu":  # Triton stages the operands of each dot chunk in shared memory
    return (bt + kp) * bk * 4
  blocks = 2 * (bt * width * itemsize + kp * width * 4)  # double-buffered stream block and phi
  temps = 3 * bt * bk * 4 + (2 * kp + SUMSQ_ROWS) * bt * 4 * 2
  return blocks + max(temps, sinkhorn_tape_bytes(n, bt, num_iters))


def sinkhorn_tape_bytes(n, block_tokens, num_iters) -> int:
  """The Sinkhorn iterates the coefficient backward keeps on chip (its largest buffer)."""
  return 2 * num_iters * n * n * block_tokens * 4


def mixing_bytes(n, c, itemsize, bs: BlockSizes, backend_name: str) -> int:
  """On-chip bytes of the mixing kernels' blocks (post_res_mix's backward, the largest)."""
  bt, bc = bs.mix_tokens, feature_block(c, bs.mix_c)
  if backend_name == "gpu":  # elementwise: registers, not shared memory
    return 0
  blocks = 2 * (2 * n + 3) * bt * bc * itemsize  # n cotangents, x_s, y; dx_s, dy (double-buffered)
  return blocks + (n + 3) * bt * bc * 4  # float32 copies of them in the body


def check_budget(n, c, itemsize, bs: BlockSizes, backend_name: str, num_iters: int = 20) -> None:
  """Raises a ValueError naming the `BlockSizes` field to shrink when a kernel would not fit."""
  budget = BUDGET_BYTES.get(backend_name)
  if budget is None:
    return
  for need, fields in ((coefficients_bytes(n, c, itemsize, bs, backend_name, num_iters),
                        ("coef_tokens", "coef_k")),
                       (mixing_bytes(n, c, itemsize, bs, backend_name), ("mix_tokens", "mix_c"))):
    if need > budget:
      field = max(fields, key=lambda f: getattr(bs, f))
      raise ValueError(
          f"BlockSizes.{field}={getattr(bs, field)}: the kernels need {need / 2**20:.2f} MiB on "
          f"chip at n={n}, C={c}, {itemsize}-byte streams; the {backend_name} budget is "
          f"{budget / 2**20:.2f} MiB. Halve BlockSizes.{field}.")


def compiler_params(backend_name: str, num_grid_dims: int, vmem_bytes: int = 0,
                    semantics: tuple[str, ...] | None = None):
  """Grids are parallel unless `semantics` says otherwise (reductions over C happen in XLA).

  On TPU a kernel whose blocks need more than the scoped default asks for `vmem_bytes` plus
  a quarter of headroom (Mosaic's own scratch), within the budget.
  """
  if backend_name == "tpu":
    limit = None
    if vmem_bytes > TPU_SCOPED_DEFAULT * 3 // 4:
      limit = min(BUDGET_BYTES["tpu"], max(vmem_bytes * 5 // 4, TPU_SCOPED_DEFAULT * 2))
    return pltpu.CompilerParams(
        dimension_semantics=semantics or ("parallel",) * num_grid_dims, vmem_limit_bytes=limit)
  if backend_name == "gpu":
    return pltriton.CompilerParams(num_warps=4, num_stages=2)
  return None


def padded_logits(num: int, backend_name: str) -> int:
  """Rows of the `(K, tokens)` logit tile: power of two >= 16 for Triton's dot, else x8."""
  if backend_name == "gpu":
    return max(16, next_pow2(num))
  return -(-num // 8) * 8


def token_block(num_tokens: int, block: int, backend_name: str) -> int:
  """Token block: `block`, or one block covering all tokens when they are fewer."""
  if num_tokens >= block:
    return block
  return max(16, next_pow2(num_tokens)) if backend_name == "gpu" else num_tokens


def feature_block(width: int, block: int) -> int:
  """Largest power-of-two multiple of 128 that is <= block and divides width."""
  b = block
  while width % b:
    b //= 2
  return b


def supports(n: int, c: int, block_sizes: BlockSizes | None = None) -> bool:
  """Whether the kernels handle `n` streams of width `c` (Triton also needs n a power of two)."""
  pow2_ok = _is_pow2(n) or backend(block_sizes) != "gpu"
  return n >= 1 and pow2_ok and c >= LANES and c % LANES == 0


def check_supported(n: int, c: int, block_sizes: BlockSizes | None = None) -> None:
  """Raises a ValueError naming the value and the fix when `supports` is False."""
  if n < 1 or not (_is_pow2(n) or backend(block_sizes) != "gpu"):
    raise ValueError(f"kernels_pallas: n={n} streams unsupported on this backend (GPU needs a "
                     "power of two); use impl='xla'.")
  if not supports(n, c, block_sizes):
    raise ValueError(
        f"kernels_pallas: C={c} is not a positive multiple of {LANES}. Pad the model width to a "
        f"multiple of {LANES} or use impl='xla'.")


def dot_nt(a, b):
  """`a @ b.T` in float32 at full precision (both operands keep their row-major layout)."""
  return jax.lax.dot_general(
      a, b, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32)


def sum_list(xs):
  return functools.reduce(operator.add, xs)


def load_rows(ref, k, num):
  """Rows `k:k+num` of a ref as float32 (a ref slice: Triton has no value slicing)."""
  return ref[pl.ds(k, num), :].astype(jnp.float32)


def load_col(tile, k):
  """Column k of a `(rows, m)` value as `(rows, 1)` via a masked lane reduction."""
  lane = jax.lax.broadcasted_iota(jnp.int32, tile.shape, 1)
  return jnp.sum(jnp.where(lane == k, tile, 0.0), axis=1, keepdims=True)


def columns_tile(cols, width):
  """Assembles `(rows, 1)` columns into a `(rows, width)` tile (zeros past len(cols))."""
  lane = jax.lax.broadcasted_iota(jnp.int32, (cols[0].shape[0], width), 1)
  return sum_list([jnp.where(lane == k, col, 0.0) for k, col in enumerate(cols)])


def column_at(col, k, width):
  """A `(rows, width)` tile holding `col (rows, 1)` at lane k (traced) and zeros elsewhere."""
  lane = jax.lax.broadcasted_iota(jnp.int32, (col.shape[0], width), 1)
  return jnp.where(lane == k, col, 0.0)


def coef_cols(h, t, width):
  """`(..., m)` coefficients -> float32 `(t, next_pow2(m))` (a power of two for Triton)."""
  h = h.reshape(t, width).astype(jnp.float32)
  return jnp.pad(h, ((0, 0), (0, next_pow2(width) - width)))


def mix_grid(t, c, n, block_sizes, backend_name, per_stream=False):
  """Grid and block specs shared by the mixing kernels (forward and backward).

  Streams are `(T, n*C)` token rows: stream j of feature block k is the lane-dense block at
  column `j * C/bc + k`, so each stream gets its own BlockSpec over the same array (no strided
  or sub-32-bit sublane loads) and the view is the one the coefficient kernel reads.
  `per_stream=True` adds a last grid axis s over the streams that a kernel writes, one per step;
  blocks that do not depend on s stay in VMEM across it (Mosaic skips the repeated copy).
  """
  bt = token_block(t, block_sizes.mix_tokens, backend_name)
  bc = feature_block(c, block_sizes.mix_c)
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
  return compiler_params(
      backend_name, 3 if per_stream else 2, vmem_bytes,
      ("parallel", "parallel") + (("arbitrary",) if per_stream else ()))


def split_streams(fn, x, n, *, token_rows):
  """`(lead, C)` of streams `x`: `(..., n, C)`, or token rows `(..., n*C)` when `token_rows`."""
  if token_rows:
    if x.ndim < 1 or x.shape[-1] % max(n, 1):
      raise ValueError(f"{fn}: token rows must have shape (..., n*C) with n={n}; got {x.shape}.")
    return x.shape[:-1], x.shape[-1] // n
  if x.ndim < 2 or x.shape[-2] != n:
    raise ValueError(f"{fn}: x must have shape (..., n, C) with n={n}; got {x.shape} (token "
                     "rows (..., n*C) need token_rows=True).")
  return x.shape[:-2], x.shape[-1]


def check_shapes(fn, x, lead, n, c, *named):
  """Each `(name, array, expected tail)` must be `(*lead, *tail)`."""
  for name, arr, tail in named:
    if arr.shape != (*lead, *tail):
      raise ValueError(f"{fn}: {name} has shape {arr.shape}, expected {(*lead, *tail)} for "
                       f"x of shape {x.shape} (n={n}, C={c}).")


def cost_estimate(*, flops: int, transcendentals: int, bytes_accessed: int) -> pl.CostEstimate:
  return pl.CostEstimate(
      flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(bytes_accessed))


def resolve(block_sizes: BlockSizes | None) -> tuple[BlockSizes, str]:
  """`(block sizes, backend name)`: the given sizes or the backend's defaults."""
  name = backend(block_sizes)
  return block_sizes or BlockSizes.for_backend(name), name
