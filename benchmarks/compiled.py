"""Compile-only figures of the dense model at the paper's 3B shape on TPU v5p: residual vs mHC.

  .venv-tpu/bin/python -m benchmarks.compiled --target=v5p-8 --json=/tmp/compiled.json

Builds each variant's train step with `launch.compile`'s machinery (C 1280, 12 blocks, 16 heads,
seq 4096, bfloat16, AdamW) and prints, per variant, per-device memory, HBM bytes and FLOPs per
step, and the roofline step time, each also as a ratio to the residual baseline of the same run.
Variants are `connection[/mhc_impl][:remat_policy]` (`mhc/pallas`: the fused kernels); the first
is the baseline.

  .venv-tpu/bin/python -m benchmarks.compiled --breakdown --variants=residual,mhc/pallas

`--breakdown` says where one block's bytes go instead: from unrolled 1- and 2-block builds, the
second block's XLA bytes accessed and its HBM traffic read from the compiled HLO
(`mhc_jax.aot.hlo`), split into the mHC ops, VMEM prefetches and the rest, then the op
groups that differ most from the baseline's.
"""

import collections
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # pylint: disable=wrong-import-position

from configs.loader import load_config  # pylint: disable=wrong-import-position
from mhc_jax.aot import hlo
from mhc_jax.aot import compile_report as aot
from mhc_jax.aot import targets  # pylint: disable=wrong-import-position

_TARGET = flags.DEFINE_string("target", "v5p-8", "Compile-only target (see mhc_jax.targets).")
_VARIANTS = flags.DEFINE_list(
    "variants", ["residual", "mhc", "mhc/pallas", "mhc:mhc_block", "mhc/pallas:mhc_block"],
    "connection[/mhc_impl][:remat_policy]; the first is the baseline.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch; 0 = one sequence per chip.")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "Sequence length.")
_LAYERS = flags.DEFINE_integer("num_layers", 12, "Transformer blocks.")
_JSON = flags.DEFINE_string("json", None, "Write {variant: report} here.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Where one block's bytes go, per variant.")
_TOP = flags.DEFINE_integer("top", 12, "--breakdown: op groups listed.")


def paper_3b_dense(variant: str, chips: int):
  """configs/default.py at the 3B shape (dense MLP, standard attention) for one variant."""
  connection, _, remat = variant.partition(":")
  connection, _, impl = connection.partition("/")
  cfg = load_config(f"configs/default.py:{connection}")
  cfg.model.update(d_model=1280, num_heads=16, num_layers=_LAYERS.value, dtype="bfloat16",
                   remat_policy=remat or "none", vocab_size=129280, mhc_impl=impl or "xla")
  cfg.seq_len, cfg.batch_size = _SEQ.value, _BATCH.value or chips
  return cfg


def _second_block(v: str, target) -> dict:
  """What the second block adds to the unrolled build of variant `v`: XLA's bytes accessed, the
  HLO's HBM traffic split into mHC ops / VMEM prefetches / rest, and the traffic by op group."""
  devices = targets.compile_only_devices(target)
  one, two = (aot.compile_unrolled(paper_3b_dense(v, target.chips), devices, k) for k in (1, 2))
  ops = [hlo.traffic_by_op(b.as_text()) for b in (one, two)]
  split = [hlo.traffic_split(o) for o in ops]
  groups = [collections.Counter(hlo.traffic_by_group(o)) for o in ops]
  groups[1].subtract(groups[0])
  return dict(xla=float(two.cost_analysis()["bytes accessed"]) -
              float(one.cost_analysis()["bytes accessed"]),
              **{k: split[1][k] - split[0][k] for k in split[0]}, groups=groups[1])


def block_breakdown(target) -> None:
  """Prints, per variant, what one block costs, and the op groups that differ most from the
  baseline's."""
  per_block = {v: _second_block(v, target) for v in _VARIANTS.value}
  hlo_total = {v: r["mhc"] + r["prefetch"] + r["rest"] for v, r in per_block.items()}
  base, mb = _VARIANTS.value[0], 1e6
  print(f"{target.name}: one block (C 1280, seq {_SEQ.value}, bf16), MB per chip; "
        "HLO = HBM traffic read from the compiled program (mhc_jax.aot.hlo)")
  print(f"{'variant':22s} {'XLA bytes':>10s} {'HLO total':>10s} {'mHC ops':>9s} "
        f"{'prefetch':>9s} {'rest':>9s} {'XLA x':>6s} {'HLO x':>6s}")
  for v, r in per_block.items():
    print(f"{v:22s} {r['xla'] / mb:10.0f} {hlo_total[v] / mb:10.0f} {r['mhc'] / mb:9.0f} "
          f"{r['prefetch'] / mb:9.0f} {r['rest'] / mb:9.0f} "
          f"{r['xla'] / per_block[base]['xla']:6.3f} {hlo_total[v] / hlo_total[base]:6.3f}")
  for v in _VARIANTS.value[1:]:
    diff = per_block[v]["groups"].copy()
    diff.subtract(per_block[base]["groups"])
    print(f"\n{v} - {base}, HLO MB per block, the {_TOP.value} largest differences:")
    for g, d in sorted(diff.items(), key=lambda item: -abs(item[1]))[:_TOP.value]:
      print(f"  {d / mb:8.1f}  {g}")


def main(argv):
  del argv
  target = targets.parse_target(_TARGET.value)
  if _BREAKDOWN.value:
    block_breakdown(target)
    return
  reports = {v: aot.compile_report(paper_3b_dense(v, target.chips), target)
             for v in _VARIANTS.value}
  base = reports[_VARIANTS.value[0]]
  gib = 2**30
  print(f"{target.name} ({target.chips} x {target.chip.name}); C 1280, {_LAYERS.value} blocks, "
        f"seq {_SEQ.value}, bf16; ratios against {_VARIANTS.value[0]}")
  print(f"{'variant':22s} {'mem/dev GiB':>12s} {'temp GiB':>9s} {'HBM GB/step':>12s} "
        f"{'roofline ms':>12s} {'mem x':>6s} {'bytes x':>8s} {'step x':>7s} fits")
  for name, r in reports.items():
    mem, hbm = r.per_device_bytes["total"], r.hbm_bytes_per_step
    print(f"{name:22s} {mem / gib:12.2f} {r.per_device_bytes['temp'] / gib:9.2f} "
          f"{hbm / 1e9:12.2f} {r.roofline_step_s * 1e3:12.1f} "
          f"{mem / base.per_device_bytes['total']:6.3f} {hbm / base.hbm_bytes_per_step:8.3f} "
          f"{r.roofline_step_s / base.roofline_step_s:7.3f} {r.fits}")
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump({k: vars(v) for k, v in reports.items()}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
