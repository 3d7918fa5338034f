r"""Compiles the train step for a real accelerator from a CPU-only host and reports what it needs.

  python -m launch.compile --config=configs/default.py --target=v5p-8 [--json=compile.json]

builds the exact step `launch.train` would run with this config (same overrides, same mesh
fields), compiled by the target's own compiler (libtpu for TPUs), and prints per-device memory
against the chip's HBM, FLOPs and HBM bytes per step, the collectives, and a roofline step time
with the MFU it implies. Targets: `v5e-N` / `v6e-N` (N chips), `v5p-N` (N TensorCores, 2 per chip,
as Cloud TPU names them) need libtpu (`make tpu-venv`); `h100` needs JAX's CUDA plugin
(`make cuda-venv`).
"""

import dataclasses
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; no accelerator is used

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from launch.cli import make_parser  # pylint: disable=wrong-import-position
from mhc_jax.aot import compile_report as aot
from mhc_jax.aot import targets  # pylint: disable=wrong-import-position

_DEFAULT = "configs/default.py"
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Run config file.")
_TARGET = flags.DEFINE_string("target", "v5p-8", "v5e-N, v6e-N (N chips) or v5p-N (N cores).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
_BYTES = flags.DEFINE_bool(
    "bytes", True, "Also build unrolled 1- and 2-block steps for the HBM bytes per step; "
    "--nobytes skips them (faster; the roofline is then compute-only).")


def main(argv):
  del argv
  try:
    target = targets.parse_target(_TARGET.value)
    report = aot.compile_report(_CONFIG.value, target, with_bytes=_BYTES.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print("\n".join(report.lines()))
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(dataclasses.asdict(report), f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=make_parser(_DEFAULT))
