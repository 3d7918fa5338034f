"""Reading a compiled program's HLO text: its kernels, collectives, sends, relayouts and traffic.

One parser of HLO instruction lines (`INSTR_RE`, `arrays`) serves all of it. The HBM traffic of
an XLA:TPU program, instruction by instruction (`traffic_by_op`):

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
counted once, so read unrolled programs (`compile_report.compile_unrolled`).
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


@dataclasses.dataclass(frozen=True)
class Instr:
  """One HLO instruction line: `[ROOT] %name = type opcode(operands), rest`."""
  computation: str
  name: str
  type_text: str
  opcode: str
  rest: str  # everything after the opcode's "("
  operands: tuple[str, ...]
  is_root: bool
  line: str


def instructions(hlo_text: str):
  """The instructions of an HLO module's text, in order, each with its computation's name."""
  computation = ""
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and line.endswith("{"):
      computation = line.split(" ")[1 if line.startswith("ENTRY") else 0].lstrip("%")
      continue
    if (m := INSTR_RE.match(line)) is None:
      continue
    name, type_text, opcode, rest = m.groups()
    operands = tuple(re.findall(r"%([\w.-]+)", rest.split("),", 1)[0]))
    yield Instr(computation, name, type_text, opcode, rest, operands,
                line.lstrip().startswith("ROOT"), line)


def traffic_by_op(hlo_text: str) -> list[Op]:
  """Every instruction that moves bytes, with its HBM bytes (operands read + results written)."""
  types, source, out = {}, {}, []
  for ins in instructions(hlo_text):
    name, type_text, opcode, rest, operands = (ins.name, ins.type_text, ins.opcode, ins.rest,
                                               ins.operands)
    computation = ins.computation
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


def op_group(op: Op) -> str:
  """A readable key: the opcode and JAX's op_name, without the layer index and jit prefix."""
  name = re.sub(r"jit\(train_step\)/|\.\d+", "", op.op_name)
  name = re.sub(r"_\d+/", "_i/", name)
  return f"{op.opcode} | {'/'.join(name.split('/')[:6])}"


_MHC_RE = re.compile(r"_conn/|jit\(pre_mix\)|jit\(post_res_mix\)|mhc_")


def traffic_split(all_ops: list[Op]) -> dict[str, int]:
  """HBM bytes of the mHC ops (the connections' coefficients, `pre_mix`, `post_res_mix`, their
  kernels), of VMEM prefetches and evictions (`copy-start`, not named after an op), and the rest."""
  out = collections.Counter()
  for op in all_ops:
    part = ("mhc" if _MHC_RE.search(op.op_name) else
            "prefetch" if op.opcode == "copy-start" else "rest")
    out[part] += op.hbm_bytes
  return {k: out[k] for k in ("mhc", "prefetch", "rest")}


def traffic_by_group(all_ops: list[Op]) -> dict[str, int]:
  """HBM bytes per `op_group` key."""
  out = collections.Counter()
  for op in all_ops:
    out[op_group(op)] += op.hbm_bytes
  return dict(out)


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# An HLO instruction reads `%name = <shape> op(operands)`: match the op, not the name.
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


# A fused kernel is a custom call named after it: `%gmm.4 = ... custom-call(...),
# custom_call_target="tpu_custom_call"` (Pallas on TPU; "mosaic_gpu" and Triton's on GPU; cuDNN's
# fused attention is "__cudnn$fmha...").
_KERNEL_RE = re.compile(
    r"%([A-Za-z_][A-Za-z0-9_]*?)(?:\.\d+)? = [^\n]*custom_call_target=\"(?:tpu_custom_call|"
    r"mosaic_gpu[^\"]*|__gpu\$xla\.gpu\.triton|__cudnn\$fmha[^\"]*)\"")


def fused_kernels(compiled) -> dict[str, int]:
  """How many calls of each fused kernel (Pallas, cuDNN attention) the program makes, by name."""
  return dict(collections.Counter(m.group(1) for m in _KERNEL_RE.finditer(compiled.as_text())))


def collectives(compiled) -> dict[str, int]:
  """How many of each collective the compiled program has (async `-start`/`-done` pairs once)."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for match in _COLLECTIVE_RE.finditer(compiled.as_text()):
    counts[match.group(1)] += 1
  return {k: v for k, v in counts.items() if v}


_SEND_START_RE = re.compile(r"%(\S+) = .*\scollective-permute-start\(")
_SEND_DONE_RE = re.compile(r"\scollective-permute-done\(%([^),\s]+)")
_COMPUTE_RE = re.compile(r"\s(fusion|convolution|dot|custom-call)\(")


def overlapped_sends(hlo_text: str) -> list[int]:
  """For each async `collective-permute` of a compiled (scheduled) program, the compute
  instructions (fusions, convolutions, dots, custom calls) scheduled between its start and done.

  A synchronous `collective-permute` counts as -1: nothing can overlap it.
  """
  open_sends: dict[str, int] = {}
  between = []
  for line in hlo_text.splitlines():
    if (start := _SEND_START_RE.search(line)) is not None:
      open_sends[start.group(1)] = 0
    elif (done := _SEND_DONE_RE.search(line)) is not None:
      between.append(open_sends.pop(done.group(1)))
    elif re.search(r"\scollective-permute\(", line):
      between.append(-1)
    elif _COMPUTE_RE.search(line):
      open_sends = {name: n + 1 for name, n in open_sends.items()}
  return between


_RELAYOUTS = ("copy", "transpose", "reshape")  # after layout assignment a free reshape is a bitcast
_TRANSPARENT = ("bitcast", "get-tuple-element", "copy-start", "copy-done")


@dataclasses.dataclass
class _Hlo:
  """The instructions of a compiled HLO module: enough to walk around its kernel calls."""
  instrs: dict  # name -> (op, largest array's elements, operand names, called computation, bytes)
  roots: dict  # computation -> op of its root
  users: dict  # name -> names of the instructions that use it
  kernels: list  # custom calls whose line names the kernel prefix


def _parse_hlo(hlo_text: str, prefix: str) -> _Hlo:
  hlo = _Hlo({}, {}, collections.defaultdict(list), [])
  for ins in instructions(hlo_text):
    sizes = [(e, b) for e, b, _ in arrays(ins.type_text)]
    calls = re.search(r"calls=%([\w.-]+)", ins.rest)
    hlo.instrs[ins.name] = (ins.opcode, max((e for e, _ in sizes), default=0), list(ins.operands),
                            calls.group(1) if calls else None, sum(b for _, b in sizes))
    if ins.is_root:
      hlo.roots[ins.computation] = ins.opcode
    for o in ins.operands:
      hlo.users[o].append(ins.name)
    if ins.opcode == "custom-call" and prefix in ins.line:  # TPU names the call after the
      hlo.kernels.append(ins.name)  # kernel; the GPU's `pallas_call.N` has it in its config
  return hlo


def kernel_relayouts(hlo_text: str, stream_elements: int, prefix: str = "mhc_") -> list[str]:
  """Relayouts of stream tensors (arrays of `stream_elements` elements) feeding or fed by the
  kernels named `prefix*`. (Other arrays next to a kernel, e.g. an MoE layer gathering the
  sublayer gradient `dy` by expert, are not the streams.)

  Reads the compiled HLO: for each operand and result of those custom calls, follows bitcasts,
  tuple elements and async copies to the producing (or consuming) instruction and reports it,
  as "kernel <- op" or "kernel -> op", when it is a copy, transpose or reshape, or a fusion whose
  root is one. An empty list means the kernels read and write the arrays where they lie.
  """
  hlo = _parse_hlo(hlo_text, prefix)

  def is_relayout(name):
    op, size, _, calls, _ = hlo.instrs[name]
    return size == stream_elements and (op in _RELAYOUTS or (op == "fusion" and
                                                           hlo.roots.get(calls) in _RELAYOUTS))

  found = []
  for kernel in hlo.kernels:
    todo = [(o, "<-") for o in hlo.instrs[kernel][2]] + [(u, "->") for u in hlo.users[kernel]]
    seen = set()
    while todo:
      name, way = todo.pop()
      if name in seen or name not in hlo.instrs:
        continue
      seen.add(name)
      if hlo.instrs[name][0] in _TRANSPARENT:
        todo += [(n, way) for n in (hlo.instrs[name][2] if way == "<-" else hlo.users[name])]
      elif is_relayout(name):
        found.append(f"{kernel} {way} {name}")
  return found


def kernel_io_bytes(hlo_text: str, prefix: str = "mhc_") -> int:
  """Bytes the kernels named `prefix*` read and write: each distinct operand buffer once, plus
  their results. What they move through HBM if every block is loaded once."""
  hlo = _parse_hlo(hlo_text, prefix)

  def source(name):  # a bitcast is the same buffer: one array passed as several operands
    while name in hlo.instrs and hlo.instrs[name][0] == "bitcast":
      name = hlo.instrs[name][2][0]
    return name

  return sum(sum(hlo.instrs[o][4] for o in {source(o) for o in hlo.instrs[k][2]}
                 if o in hlo.instrs) + hlo.instrs[k][4] for k in hlo.kernels)
