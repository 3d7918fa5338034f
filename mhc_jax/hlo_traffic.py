"""HBM traffic of a compiled XLA:TPU program, instruction by instruction, from its HLO text.

XLA's `cost_analysis()` gives one "bytes accessed" total per program. To see where the bytes go,
this reads the compiled HLO: every instruction outside fusion and reduction bodies moves its
operands and results, counted where they lie in HBM. What the model assumes:
- An array in VMEM (layout memory space `S(1)`) costs nothing to read or write; the async copy
  that prefetches it (`copy-start`, HBM -> VMEM) is charged one HBM read, and one that evicts it
  one HBM write. (XLA's own count also charges the VMEM side.)
- An operand passed several times (a Pallas kernel reads the same streams once per stream
  BlockSpec, through bitcasts of one buffer) is read once.
- A fusion reads the whole of each operand and writes its whole result; a kernel reads its
  operands once. Kernels that re-read blocks (flash attention's keys and values) are undercounted,
  so compare variants that share them.
Bookkeeping instructions (parameters, tuples, bitcasts, `*-done`) move nothing. A loop body is
counted once, so read unrolled programs (`aot.compile_unrolled`).
"""

import collections
import dataclasses
import math
import re

INSTR_RE = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([\w-]+)\((.*)$")  # name, type, op, rest
_ARRAY_RE = re.compile(r"(pred|[a-z]+\d+)\[([\d,]*)\](\{[^}]*\})?")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4,
               "u32": 4, "f64": 8, "s64": 8}
_FREE = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "after-all",
         "copy-done", "all-gather-done", "all-reduce-done", "collective-permute-done",
         "opt-barrier", "partition-id", "replica-id"}
# Computations whose instructions run inside another one (fusion, reduction, sort bodies).
_BODY_RE = re.compile(r"(fused_|wrapped_|region_|bitcast_fusion|"
                      r"(add|max|min|and|or|ge|gt|lt|select)([._]|$))")
VMEM = 1  # TPU memory space of the on-chip vector memory


@dataclasses.dataclass(frozen=True)
class Op:
  """One instruction: its opcode (and fusion kind), JAX's `op_name`, and its HBM bytes."""
  opcode: str
  op_name: str
  hbm_bytes: int


def arrays(type_text: str) -> list[tuple[int, int, int]]:
  """`(elements, bytes, memory space)` of each array in an HLO type (an array or a tuple)."""
  out = []
  for dtype, dims, layout in _ARRAY_RE.findall(type_text):
    elements = math.prod(int(d) for d in dims.split(",") if d)
    space = re.search(r"S\((\d+)\)", layout or "")
    space = int(space.group(1)) if space else 0
    out.append((elements, elements * _ITEM_BYTES.get(dtype, 4), space))
  return out


def ops(hlo_text: str) -> list[Op]:
  """Every instruction that moves bytes, with its HBM bytes (operands read + results written)."""
  types, source, out, computation = {}, {}, [], ""
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and line.endswith("{"):
      computation = line.split(" ")[1 if line.startswith("ENTRY") else 0].lstrip("%")
      continue
    if (m := INSTR_RE.match(line)) is None:
      continue
    name, type_text, opcode, rest = m.groups()
    operands = re.findall(r"%([\w.-]+)", rest.split("),", 1)[0])
    types[name] = [(b, s) for _, b, s in arrays(type_text)]
    if opcode == "bitcast":
      source[name] = source.get(operands[0], operands[0])
    elif opcode == "get-tuple-element":
      index, parts = int(re.search(r"index=(\d+)", rest).group(1)), types.get(operands[0], [])
      types[name] = parts[index:index + 1] or types[name]
    if opcode in _FREE or _BODY_RE.match(computation):
      continue
    read = sum(b for o in {source.get(o, o) for o in operands} for b, s in types.get(o, ())
               if s != VMEM)
    results = types[name][:1] if opcode == "copy-start" else types[name]  # (dest, src, context)
    written = sum(b for b, s in results if s != VMEM)
    kind = re.search(r"kind=(\w+)", rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    out.append(Op(opcode + (f":{kind.group(1)}" if kind else ""),
                  op_name.group(1) if op_name else "", read + written))
  return out


def group(op: Op) -> str:
  """A readable key: the opcode and JAX's op_name, without the layer index and jit prefix."""
  name = re.sub(r"jit\(train_step\)/|\.\d+", "", op.op_name)
  name = re.sub(r"_\d+/", "_i/", name)
  return f"{op.opcode} | {'/'.join(name.split('/')[:6])}"


_MHC_RE = re.compile(r"_conn/|jit\(pre_mix\)|jit\(post_res_mix\)|mhc_")


def split(all_ops: list[Op]) -> dict[str, int]:
  """HBM bytes of the mHC ops (the connections' coefficients, `pre_mix`, `post_res_mix`, their
  kernels), of VMEM prefetches and evictions (`copy-start`, not named after an op), and the rest."""
  out = collections.Counter()
  for op in all_ops:
    part = ("mhc" if _MHC_RE.search(op.op_name) else
            "prefetch" if op.opcode == "copy-start" else "rest")
    out[part] += op.hbm_bytes
  return {k: out[k] for k in ("mhc", "prefetch", "rest")}


def by_group(all_ops: list[Op]) -> dict[str, int]:
  out = collections.Counter()
  for op in all_ops:
    out[group(op)] += op.hbm_bytes
  return dict(out)
