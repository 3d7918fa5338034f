"""Config, backend dispatch and the math shared by the Pallas kernels and their reference.

The Sinkhorn and coefficient helpers take the n rows of each matrix as separate arrays of shape
`(n, ...)`: the kernels pass `(n, block_tokens)` slices of a lane-dense `(K, tokens)` logit tile,
the reference passes `(n, tokens)` arrays. Row sums reduce axis 0 and column sums add the row
arrays, so there are no tiny matmuls and the same code lowers on Mosaic TPU, Triton and the
interpreter.
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
  compile-only TPU from a CPU host) must say so: `sharded.py` sets the backend from its mesh.
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


# ----- Sinkhorn on the n rows of the logit matrix (spec §4) -----
# Row i of an (n, n) matrix is one array of shape (n, ...): entry j on axis 0, tokens after.
# Row sums reduce axis 0; column sums add the n row arrays.

def sum_list(xs):
  return functools.reduce(operator.add, xs)


def _normalize_rows(m, eps, tape):
  dens = [jnp.sum(mi, axis=0, keepdims=True) + eps for mi in m]
  out = [mi / d for mi, d in zip(m, dens)]
  tape.append(("rows", out, dens))
  return out


def _normalize_cols(m, eps, tape):
  den = sum_list(m) + eps
  out = [mi / den for mi in m]
  tape.append(("cols", out, den))
  return out


def _normalize_vjp(dy, kind, y, den):
  """`y = m / (sum(m) + eps)` along rows or columns: `dm = (dy - sum(dy * y)) / den`."""
  if kind == "rows":
    return [(dyi - jnp.sum(dyi * yi, axis=0, keepdims=True)) / d
            for dyi, yi, d in zip(dy, y, den)]
  s = sum_list([dyi * yi for dyi, yi in zip(dy, y)])
  return [(dyi - s) / den for dyi in dy]


def _column_softmax(logit_rows):
  mx = jax.lax.stop_gradient(functools.reduce(jnp.maximum, logit_rows))
  e = [jnp.exp(l - mx) for l in logit_rows]
  total = sum_list(e)
  return [ei / total for ei in e]


def _iteration(m, eps, tape):
  """One (cols, rows) Sinkhorn iteration."""
  return _normalize_rows(_normalize_cols(m, eps, tape), eps, tape)


def sinkhorn_forward(logit_rows, *, num_iters, eps, loop=False):
  """Column softmax + eps, row-normalise, then (cols, rows) `num_iters - 1` times.

  Returns `(rows, residuals)`; the residuals (every iterate) feed `sinkhorn_vjp`, which is how
  the backward kernel recomputes the iterations on chip instead of reading them from HBM.
  `loop=True` runs the iterations as a loop and keeps no residuals (a forward-only kernel).
  """
  p = _column_softmax(logit_rows)
  tape = []
  m = _normalize_rows([pi + eps for pi in p], eps, tape)
  if loop:
    return jax.lax.fori_loop(0, num_iters - 1, lambda _, m: _iteration(m, eps, []), m), None
  for _ in range(num_iters - 1):
    m = _iteration(m, eps, tape)
  return m, (p, tape)


def _sinkhorn_vjp_loop(logit_rows, d_rows, *, num_iters, eps):
  """`sinkhorn_vjp` with loops, not unrolled code: iteration k's input is recomputed from the
  first iterate (about num_iters**2 / 2 iterations instead of a tape of num_iters)."""
  p = _column_softmax(logit_rows)
  first_tape = []
  m0 = _normalize_rows([pi + eps for pi in p], eps, first_tape)

  def back(j, d):
    m = jax.lax.fori_loop(0, num_iters - 2 - j, lambda _, m: _iteration(m, eps, []), m0)
    tape = []
    _iteration(m, eps, tape)
    for kind, y, den in reversed(tape):
      d = _normalize_vjp(d, kind, y, den)
    return d

  d_rows = jax.lax.fori_loop(0, num_iters - 1, back, d_rows)
  d_rows = _normalize_vjp(d_rows, *first_tape[0])
  s = sum_list([di * pi for di, pi in zip(d_rows, p)])
  return [pi * (di - s) for di, pi in zip(d_rows, p)]


def sinkhorn_vjp(logit_rows, d_rows, *, num_iters, eps, loop=False):
  """Cotangent of the logit rows given that of the output rows, through every iteration."""
  if loop:
    return _sinkhorn_vjp_loop(logit_rows, d_rows, num_iters=num_iters, eps=eps)
  _, (p, tape) = sinkhorn_forward(logit_rows, num_iters=num_iters, eps=eps)
  for kind, y, den in reversed(tape):
    d_rows = _normalize_vjp(d_rows, kind, y, den)
  s = sum_list([di * pi for di, pi in zip(d_rows, p)])
  return [pi * (di - s) for di, pi in zip(d_rows, p)]


def coefficients_from_rows(pre, post, res_rows, *, num_iters, eps, post_scale, loop=False):
  """Logits `pre (n, ...)`, `post (n, ...)`, n res rows -> `h_pre`, `h_post`, `h_res` rows."""
  h_res, _ = sinkhorn_forward(res_rows, num_iters=num_iters, eps=eps, loop=loop)
  return jax.nn.sigmoid(pre) + eps, post_scale * jax.nn.sigmoid(post), h_res


def coefficients_vjp_rows(pre, post, res_rows, g_pre, g_post, g_res_rows, *, num_iters, eps,
                          post_scale, loop=False):
  """Cotangents of the logits (same layout) given those of `h_pre`, `h_post`, `h_res`."""
  s_pre, s_post = jax.nn.sigmoid(pre), jax.nn.sigmoid(post)
  d_res = sinkhorn_vjp(res_rows, g_res_rows, num_iters=num_iters, eps=eps, loop=loop)
  return g_pre * s_pre * (1.0 - s_pre), g_post * (post_scale * s_post * (1.0 - s_post)), d_res


def cost_estimate(*, flops: int, transcendentals: int, bytes_accessed: int) -> pl.CostEstimate:
  return pl.CostEstimate(
      flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(bytes_accessed))
