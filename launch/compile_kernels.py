r"""Compiles every mHC kernel, forward and backward, with the real compilers of named targets.

  .venv-tpu/bin/python -m launch.compile_kernels --targets=v5e-4,v5p-8,v6e-4   # Mosaic (libtpu)
  .venv-cuda/bin/python -m launch.compile_kernels --targets=h100             # Triton + ptxas
  make compile-check                                                        # both, full matrix

For each target, dtype, n, C and kernel it builds the op as the model calls it (streams as token
rows `(4, 4096, n*C)`) and its VJP (the forward and backward kernels), on one compile-only device,
and prints compile seconds, temp memory and the kernels' HBM reads and writes per token in the
compiled program (`hlo.kernel_io_bytes`; for a forward also the least possible, math.md §9),
or the compiler's first error line, and any relayout of the streams next to a kernel
(`hlo.kernel_relayouts`). Exits 1 if anything failed.
`--subset=ci` builds each kernel and direction once per target, rotating dtype, n and C.
"""

import itertools
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; no accelerator is used

from absl import app, flags  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=wrong-import-position

import kernels_pallas  # pylint: disable=wrong-import-position
from mhc_jax.aot import hlo, targets  # pylint: disable=wrong-import-position
from mhc_jax.parallel import platform  # pylint: disable=wrong-import-position

KERNELS = ("coefficients", "pre_mix", "post_res_mix")
DIRECTIONS = ("fwd", "vjp")
_TARGETS = flags.DEFINE_list("targets", ["v5e-4", "v5p-8", "v6e-4"], "Compile-only targets.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Stream dtypes.")
_NS = flags.DEFINE_list("n", ["2", "4", "8"], "Stream counts.")
_CS = flags.DEFINE_list("c", ["128", "1280", "2560"], "Model widths.")
_TOKENS = flags.DEFINE_integer("seq_len", 4096, "Tokens per sequence (4 sequences).")
_SUBSET = flags.DEFINE_enum("subset", "all", ["all", "ci"], "all: the full matrix; ci: each "
                            "kernel and direction once per target.")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")


def _cases(subset: str, target_index: int, dtypes, ns, cs):
  """(dtype, n, c, kernel, direction) tuples. `ci`: each kernel and direction once, the dtype
  alternating over them and over the targets (so every kernel, direction and dtype meets on some
  target), n and C rotating."""
  ops = list(itertools.product(KERNELS, DIRECTIONS))
  if subset == "all":
    return [(d, n, c, k, w) for d, n, c in itertools.product(dtypes, ns, cs) for k, w in ops]
  shapes = list(itertools.product(ns, cs))
  return [(dtypes[(i + target_index) % len(dtypes)], *shapes[(i + 2 * target_index) % len(shapes)],
           k, w) for i, (k, w) in enumerate(ops)]


def build(kernel: str, direction: str, dtype, n: int, c: int, seq_len: int, device):
  """The jitted op (or its VJP) and its abstract arguments, on one compile-only `device`."""
  mesh = jax.sharding.Mesh([device], ("d",))
  bs = platform.kernel_block_sizes(mesh)
  rep = NamedSharding(mesh, P())
  arg = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt, sharding=rep)
  lead, k = (4, seq_len), n * n + 2 * n
  x = arg((*lead, n * c), dtype)  # token rows, as the model carries the streams
  if kernel == "coefficients":
    fn = lambda x, phi, a, b: kernels_pallas.mhc_coefficients(
        x, phi, a, b, token_rows=True, block_sizes=bs)
    args = (x, arg((n * c, k)), arg((3,)), arg((k,)))
  elif kernel == "pre_mix":
    fn = lambda x, h: kernels_pallas.pre_mix(x, h, token_rows=True, block_sizes=bs)
    args = (x, arg((*lead, n)))
  else:
    fn = lambda x, y, hp, hr: kernels_pallas.post_res_mix(
        x, y, hp, hr, token_rows=True, block_sizes=bs)
    args = (x, arg((*lead, c), dtype), arg((*lead, n)), arg((*lead, n, n)))
  if direction == "vjp":  # forward and backward, the cotangent an argument (not recomputed)
    forward, primals = fn, args
    cotangent = jax.tree.map(lambda o: arg(o.shape, o.dtype), jax.eval_shape(forward, *primals))
    fn = lambda ct, *a: jax.vjp(forward, *a)[1](ct)
    args = (cotangent, *primals)
  return jax.jit(fn), args


def min_bytes_per_token(kernel: str, n: int, c: int, itemsize: int) -> int:
  """The forward's least traffic per token (math.md §9): streams read once, results written
  once, float32 coefficients (read by the mixing kernels, written by the coefficient kernel)."""
  streams_read, streams_written, coefs = {
      "coefficients": (n, 0, n * n + 2 * n), "pre_mix": (n, 1, n),
      "post_res_mix": (n + 1, n, n + n * n)}[kernel]
  return (streams_read + streams_written) * c * itemsize + 4 * coefs


def compile_case(kernel, direction, dtype, n, c, seq_len, device) -> dict:
  """Compiles one case; returns its figures or the compiler's first error line."""
  fn, args = build(kernel, direction, jnp.dtype(dtype), n, c, seq_len, device)
  row = dict(kernel=kernel, direction=direction, dtype=dtype, n=n, c=c)
  start = time.perf_counter()
  try:
    compiled = fn.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except  (the compiler's verdict is the result)
    lines = [l for l in str(e).splitlines() if l.strip()]
    return {**row, "ok": False, "error": lines[0][:300] if lines else type(e).__name__,
            "compile_s": time.perf_counter() - start}
  mem = compiled.memory_analysis()
  hlo_text = compiled.as_text()
  relayouts = hlo.kernel_relayouts(hlo_text, 4 * seq_len * n * c)
  tokens = 4 * seq_len
  return {**row, "ok": not relayouts, "compile_s": time.perf_counter() - start,
          "temp_bytes": float(mem.temp_size_in_bytes) if mem is not None else None,
          "relayouts": relayouts, "io_bytes_per_token": hlo.kernel_io_bytes(hlo_text) / tokens,
          "min_bytes_per_token": (min_bytes_per_token(kernel, n, c, jnp.dtype(dtype).itemsize)
                                  if direction == "fwd" else None)}


def main(argv):
  del argv
  results, failed = [], 0
  for t, target_name in enumerate(_TARGETS.value):
    try:
      device = targets.compile_only_devices(targets.parse_target(target_name))[0]
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    for dtype, n, c, kernel, direction in _cases(_SUBSET.value, t, _DTYPES.value,
                                                 [int(v) for v in _NS.value],
                                                 [int(v) for v in _CS.value]):
      r = {"target": target_name, **compile_case(kernel, direction, dtype, n, c,
                                                 _TOKENS.value, device)}
      results.append(r)
      failed += not r["ok"]
      low = r.get("min_bytes_per_token")
      minimum = f" (min {low:.0f}, x{r['io_bytes_per_token'] / low:.3f})" if low else ""
      verdict = (f"ok {r['compile_s']:6.1f} s  temp {r['temp_bytes'] / 2**20:8.1f} MiB  kernel I/O "
                 f"{r['io_bytes_per_token']:.0f} B/token{minimum}"
                 if r["ok"] else f"FAILED: {r.get('error') or r['relayouts']}")
      print(f"{target_name:7s} {kernel:13s} {direction:3s} {dtype:8s} n={n} C={c:<5d} {verdict}",
            flush=True)
  print(f"{len(results) - failed} of {len(results)} compiled without relayouts")
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  app.run(main)
