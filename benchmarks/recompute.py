"""Temp memory per device of the paper's block recompute at several group sizes `L_r`.

  .venv-tpu/bin/python -m benchmarks.recompute --target=v5p-8 --groups=1,2,3,4,6
  python -m benchmarks.recompute --target=cpu --d_model=256 --num_heads=4 --seq_len=512 \
      --batch_size=8

Compiles the mHC train step (`remat_policy=mhc_block`, `recompute_blocks=L_r`) of the dense
model and prints, per `L_r`, the compiled temp memory per device, its change against `L_r = 1`
in the same run, and beside it the paper's stream formula (math.md §8) for the shape:
`n C ceil(L / L_r)` kept + `(n + 2) C 2 L_r` rebuilt, per token. `--target=cpu` compiles for
this host (one CPU device); any other target is a compile-only build (see mhc_jax.targets).
"""

import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from configs.loader import load_config  # pylint: disable=wrong-import-position
from mhc_jax.aot import compile_report as aot
from mhc_jax.aot import targets  # pylint: disable=wrong-import-position
from mhc_jax.model.recompute import optimal_group  # pylint: disable=wrong-import-position

_TARGET = flags.DEFINE_string("target", "v5p-8", "'cpu' or a compile-only target.")
_GROUPS = flags.DEFINE_list("groups", ["1", "2", "3", "4", "6"], "L_r values, in blocks.")
_D_MODEL = flags.DEFINE_integer("d_model", 1280, "Width C.")
_HEADS = flags.DEFINE_integer("num_heads", 16, "Attention heads.")
_LAYERS = flags.DEFINE_integer("num_layers", 12, "Transformer blocks L.")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch; 0 = one sequence per device.")


def _config(group: int, devices: int):
  cfg = load_config("configs/default.py:mhc")
  bf16 = _TARGET.value != "cpu"
  cfg.model.update(d_model=_D_MODEL.value, num_heads=_HEADS.value,
                   num_layers=_LAYERS.value, dtype="bfloat16" if bf16 else "float32",
                   vocab_size=129280 if bf16 else 256, remat_policy="mhc_block",
                   recompute_blocks=group)
  cfg.seq_len, cfg.batch_size = _SEQ.value, _BATCH.value or devices
  return cfg


def _temp_bytes(group: int) -> tuple[float, int]:
  """(compiled temp bytes per device, tokens per device) at `group`."""
  if _TARGET.value == "cpu":
    devices = jax.devices()[:1]
  else:
    devices = targets.compile_only_devices(targets.parse_target(_TARGET.value))
  cfg = _config(group, len(devices))
  mem = aot.compile_train_step(cfg, devices).memory_analysis()
  return float(mem.temp_size_in_bytes), cfg.batch_size * cfg.seq_len // len(devices)


def main(argv):
  del argv
  groups = [int(g) for g in _GROUPS.value]
  n, c, layers = 4, _D_MODEL.value, _LAYERS.value
  value_bytes = jnp.dtype(jnp.float32 if _TARGET.value == "cpu" else jnp.bfloat16).itemsize
  print(f"{_TARGET.value}: mHC n={n}, C {c}, {layers} blocks, seq {_SEQ.value}; "
        f"formula optimum L_r* = {optimal_group(n, layers)} blocks")
  print(f"{'L_r':>4s} {'temp MiB':>10s} {'vs L_r=1 MiB':>13s} {'formula MiB':>12s} "
        f"{'formula vs L_r=1':>17s}")
  base = None
  for group in groups:
    temp, tokens = _temp_bytes(group)
    g = group or optimal_group(n, layers)
    formula = (n * c * math.ceil(layers / g) + (n + 2) * c * 2 * g) * tokens * value_bytes
    if base is None:
      base = (temp, formula)
    mib = 2**20
    print(f"{group:4d} {temp / mib:10.1f} {(temp - base[0]) / mib:+13.1f} {formula / mib:12.1f} "
          f"{(formula - base[1]) / mib:+17.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
