"""Compile-only figures of the dense model at the paper's 3B shape on TPU v5p: residual vs mHC.

  .venv-tpu/bin/python -m benchmarks.compiled --target=v5p-8 --json=/tmp/compiled.json

Builds each variant's train step with `launch.compile`'s machinery (C 1280, 12 blocks, 16 heads,
seq 4096, bfloat16, AdamW) and prints, per variant, per-device memory, HBM bytes and FLOPs per
step, and the roofline step time, each also as a ratio to the residual baseline of the same run.
Variants are `connection[/mhc_impl][:remat_policy]` (`mhc/pallas`: the fused kernels); the first
is the baseline.
"""

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # pylint: disable=wrong-import-position

from launch.cli import load_config  # pylint: disable=wrong-import-position
from mhc_jax import aot, targets  # pylint: disable=wrong-import-position

_TARGET = flags.DEFINE_string("target", "v5p-8", "Compile-only target (see mhc_jax.targets).")
_VARIANTS = flags.DEFINE_list(
    "variants", ["residual", "mhc", "mhc/pallas", "mhc:mhc_block", "mhc/pallas:mhc_block"],
    "connection[/mhc_impl][:remat_policy]; the first is the baseline.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch; 0 = one sequence per chip.")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "Sequence length.")
_LAYERS = flags.DEFINE_integer("num_layers", 12, "Transformer blocks.")
_JSON = flags.DEFINE_string("json", None, "Write {variant: report} here.")


def paper_3b_dense(variant: str, chips: int):
  """configs/default.py at the 3B shape (dense MLP, standard attention) for one variant."""
  connection, _, remat = variant.partition(":")
  connection, _, impl = connection.partition("/")
  cfg = load_config(f"configs/default.py:{connection}")
  cfg.model.update(d_model=1280, num_heads=16, num_layers=_LAYERS.value, dtype="bfloat16",
                   remat_policy=remat or "none", vocab_size=129280, mhc_impl=impl or "xla")
  cfg.seq_len, cfg.batch_size = _SEQ.value, _BATCH.value or chips
  return cfg


def main(argv):
  del argv
  target = targets.parse_target(_TARGET.value)
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
