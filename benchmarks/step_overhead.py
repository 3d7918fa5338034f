"""Train-step time and compiled temporary memory of residual vs HC vs mHC at equal width/depth.

  python -m benchmarks.step_overhead --d_model=256,512,1024 --json=/tmp/overhead.json

Each variant's jitted step (forward + backward + AdamW) is compiled once, then the variants are
timed round-robin (so machine noise hits all of them alike) and the medians are compared to the
residual baseline of the same run.
"""

import json
import statistics
import time

import jax
import optax
from absl import app, flags

from mhc_jax.model.config import ModelConfig
from mhc_jax.model.decoder import DecoderLM
from mhc_jax.training.steps import create_state, train_step

_D_MODEL = flags.DEFINE_list("d_model", ["256", "512", "1024"], "Widths to measure.")
_LAYERS = flags.DEFINE_integer("num_layers", 4, "Transformer blocks.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch size.")
_N = flags.DEFINE_integer("n_streams", 4, "Streams of the HC and mHC variants.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per variant.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["residual", "hc", "mhc", "mhc:mhc_block"],
    "Connections to compare, each optionally `:remat_policy` (else --remat_policy); the first "
    "is the baseline of the ratios.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Activation dtype.")
_REMAT = flags.DEFINE_string("remat_policy", "none", "Remat policy of variants that name none.")
_JSON = flags.DEFINE_string("json", None, "Write {d_model: {variant: {...}}} here.")


def compile_step(variant: str, d_model: int):
  """Returns `(compiled_step, state, batch)` for one `connection[:remat_policy]` variant."""
  connection, _, remat = variant.partition(":")
  cfg = ModelConfig(
      d_model=d_model, num_layers=_LAYERS.value, num_heads=max(d_model // 64, 1),
      connection=connection, n_streams=1 if connection == "residual" else _N.value,
      dtype=_DTYPE.value, remat_policy=remat or _REMAT.value)
  tokens = jax.random.randint(jax.random.key(1), (_BATCH.value, _SEQ.value + 1), 0, 256)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  state, _ = create_state(DecoderLM(cfg), optax.adamw(1e-4), jax.random.key(0), batch["inputs"])
  compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
  return compiled, state, batch


def measure(d_model: int) -> dict:
  steps, states, batches, temp = {}, {}, {}, {}
  for v in _VARIANTS.value:
    steps[v], states[v], batches[v] = compile_step(v, d_model)
    temp[v] = steps[v].memory_analysis().temp_size_in_bytes
    states[v], _ = jax.block_until_ready(steps[v](states[v], batches[v]))  # warm-up
  times = {v: [] for v in _VARIANTS.value}
  for _ in range(_REPEATS.value):
    for v in _VARIANTS.value:
      t0 = time.perf_counter()
      states[v], metrics = steps[v](states[v], batches[v])
      jax.block_until_ready(metrics)
      times[v].append(time.perf_counter() - t0)
  base = _VARIANTS.value[0]
  med = {v: statistics.median(t) for v, t in times.items()}
  return {v: {"median_s": med[v], "ratio_vs_residual": med[v] / med[base],
              "temp_bytes": int(temp[v]), "temp_ratio_vs_residual": temp[v] / max(temp[base], 1)}
          for v in _VARIANTS.value}


def main(argv):
  del argv
  print(f"devices={jax.devices()} layers={_LAYERS.value} seq={_SEQ.value} batch={_BATCH.value} "
        f"n={_N.value} dtype={_DTYPE.value} remat={_REMAT.value} repeats={_REPEATS.value}")
  results = {}
  for d in map(int, _D_MODEL.value):
    results[d] = measure(d)
    for v, r in results[d].items():
      print(f"d_model={d:5d} {v:14s} median={r['median_s'] * 1e3:8.1f} ms "
            f"ratio={r['ratio_vs_residual']:.3f} temp={r['temp_bytes'] / 2**20:8.1f} MiB "
            f"temp_ratio={r['temp_ratio_vs_residual']:.2f}", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
