"""The stability study: connection variants x seeds at equal width, depth, data, steps and LR.

Each run is an ordinary training run in `<study_dir>/<variant>/seed<k>/`, so it resumes like one.
`summarize` reads their `metrics.jsonl` into the numbers the paper reports (final loss, the largest
composite Amax gain and where it occurred, gradient-norm spikes); `final_h_res` reloads a finished
run for the `H_res` heatmaps of the paper's Fig. 8.
"""

import copy
import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mhc_jax.model.config import CONNECTIONS
from mhc_jax.model.decoder import DecoderLM
from mhc_jax.training import checkpoint, data, train
from mhc_jax.training.metrics import METRICS_FILE, read_metrics

VARIANTS = CONNECTIONS  # every connection, in the order of the table


@dataclasses.dataclass(frozen=True)
class Run:
  variant: str  # A connection name.
  seed: int  # The run's config.seed (params init and data order).
  workdir: str  # <study_dir>/<variant>/seed<seed>
  config: ml_collections.ConfigDict  # The full `launch.train` config of this run.


def run_config(train_cfg: ml_collections.ConfigDict, variant: str, seed: int,
               n_streams: int) -> ml_collections.ConfigDict:
  """`train_cfg` with the connection, its stream count and the seed of one run."""
  cfg = copy.deepcopy(train_cfg)
  cfg.model.connection = variant
  cfg.model.n_streams = 1 if variant == "residual" else n_streams
  cfg.seed = seed
  return cfg


def plan_runs(study_cfg: ml_collections.ConfigDict, study_dir: str) -> list[Run]:
  """Every (variant, seed) run of the study, seed-major: each variant's first seed comes first."""
  variants = [v.strip() for v in study_cfg.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or not variants:
    raise ValueError(f"config.variants={study_cfg.variants!r} is invalid: use a comma-separated "
                     f"subset of {','.join(VARIANTS)}.")
  if study_cfg.seeds < 1:
    raise ValueError(f"config.seeds={study_cfg.seeds!r} is invalid: must be >= 1.")
  seeds = range(study_cfg.first_seed, study_cfg.first_seed + study_cfg.seeds)
  return [Run(v, s, os.path.join(study_dir, v, f"seed{s}"),
              run_config(study_cfg.train, v, s, study_cfg.n_streams))
          for s in seeds for v in variants]


PLAN_FILE = "study_config.json"


def save_plan(study_cfg: ml_collections.ConfigDict, study_dir: str) -> None:
  """Writes the study config into `study_dir`, so the study can be re-read (`load_plan`)."""
  os.makedirs(study_dir, exist_ok=True)
  with open(os.path.join(study_dir, PLAN_FILE), "w", encoding="utf-8") as f:
    json.dump(study_cfg.to_dict(), f, indent=2)


def load_plan(study_dir: str) -> tuple[ml_collections.ConfigDict, list[Run]]:
  """`(study config, runs)` of a study written by `launch.study` (or `save_plan`)."""
  path = os.path.join(study_dir, PLAN_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{path} does not exist: {study_dir} is not a study directory; run "
                     f"python -m launch.study --workdir={study_dir} first.")
  with open(path, encoding="utf-8") as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  return cfg, plan_runs(cfg, study_dir)


def _latest_step(workdir: str) -> int | None:
  mngr = checkpoint.make_manager(workdir)
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


DIVERGED_FILE = "diverged.txt"  # A run whose loss became NaN/Inf: the error, kept as its result.


def is_finished(run: Run) -> bool:
  """True when the run's newest checkpoint is at its last step, or the run diverged."""
  return (os.path.exists(os.path.join(run.workdir, DIVERGED_FILE))
          or _latest_step(run.workdir) == run.config.total_steps)


def run_study(runs: list[Run], log: Callable[[str], None] = print) -> bool:
  """Trains every unfinished run in order (resuming interrupted ones); False if one was stopped
  early by SIGTERM (it saved a checkpoint; calling again resumes it). A run whose loss becomes
  non-finite is recorded as diverged (`DIVERGED_FILE`) and the study goes on."""
  for k, run in enumerate(runs, 1):
    tag = f"[{k}/{len(runs)}] {run.workdir}"
    if is_finished(run):
      log(f"{tag}: finished, skipped")
      continue
    log(f"{tag}: training {run.variant}, seed {run.seed}")
    start = time.perf_counter()
    try:
      train.train_and_evaluate(run.config, run.workdir)
    except train.NonFiniteLossError as e:  # A result of the study, not a failure of it.
      log(f"{tag}: diverged: {e}")
      with open(os.path.join(run.workdir, DIVERGED_FILE), "w", encoding="utf-8") as f:
        f.write(f"{e}\n")
    if not is_finished(run):
      log(f"{tag}: stopped early; run the study again to resume.")
      return False
    log(f"{tag}: {time.perf_counter() - start:.0f} s")
  return True


def override_flags(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict,
                   prefix: str = "config") -> list[str]:
  """`--config.a.b=value` flags that turn `base` into `config` (for printed commands)."""
  flags = []
  for key, value in config.items():
    name = f"{prefix}.{key}"
    if isinstance(value, ml_collections.ConfigDict):
      flags += override_flags(value, base[key], name)
    elif value != base.get(key):
      flags.append(f"--{name}={value}")
  return flags


def count_spikes(grad_norms: np.ndarray, factor: float, window: int) -> int:
  """Logged steps whose grad norm exceeds `factor` x the median of the `window` logged before it.

  The first `window` values (warm-up) are never counted.
  """
  g = np.asarray(grad_norms, np.float64)
  return int(sum(g[i] > factor * np.median(g[i - window:i]) for i in range(window, g.size)))


def _argmax_over_diag(records: list[dict], key: str) -> dict[str, Any]:
  """`{value, step, layer}` of the largest per-layer `key` over all logged diagnostics."""
  best = {"value": float("nan"), "step": None, "layer": None}
  for r in records:
    if key in r and (best["step"] is None or max(r[key]) > best["value"]):
      layer = int(np.argmax(r[key]))
      best = {"value": float(r[key][layer]), "step": r["step"], "layer": layer}
  return best


def summarize_run(records: list[dict], *, spike_factor: float, spike_window: int,
                  diverged: bool = False) -> dict:
  """The study's numbers for one run's metrics records (a diverged run's eval loss is NaN)."""
  evals = [r for r in records if "eval_loss" in r]
  grads = np.array([r["grad_norm"] for r in records if "grad_norm" in r])
  return {
      "diverged": diverged,
      "final_step": records[-1]["step"] if records else 0,
      "eval_loss": evals[-1]["eval_loss"] if evals and not diverged else float("nan"),
      "composite_fwd": _argmax_over_diag(records, "diag/composite_fwd_avg"),
      "composite_bwd": _argmax_over_diag(records, "diag/composite_bwd_avg"),
      "grad_norm_max": float(grads.max()) if grads.size else float("nan"),
      "spikes": count_spikes(grads, spike_factor, spike_window),
  }


def _mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single seed)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarize(runs: list[Run], *, spike_factor: float, spike_window: int) -> dict[str, dict]:
  """`{variant: {eval_loss_mean, eval_loss_std, gap_to_residual, max_composite_fwd, ...}}`."""
  per_run = {}
  for run in runs:
    diverged = os.path.exists(os.path.join(run.workdir, DIVERGED_FILE))
    logged = os.path.exists(os.path.join(run.workdir, METRICS_FILE))
    records = read_metrics(run.workdir) if logged or not diverged else []  # NaN at step 1
    per_run[run.workdir] = summarize_run(records, spike_factor=spike_factor,
                                         spike_window=spike_window, diverged=diverged)
  out = {}
  for variant in dict.fromkeys(r.variant for r in runs):
    mine = [(r, per_run[r.workdir]) for r in runs if r.variant == variant]
    mean, std = _mean_std([s["eval_loss"] for _, s in mine])
    entry = {"seeds": [r.seed for r, _ in mine], "eval_loss_mean": mean,
             "eval_loss_std": std, "eval_loss_per_seed": [s["eval_loss"] for _, s in mine],
             "final_step": min(s["final_step"] for _, s in mine),
             "diverged_seeds": [r.seed for r, s in mine if s["diverged"]],
             "grad_norm_spikes": [s["spikes"] for _, s in mine],
             "grad_norm_max": max(s["grad_norm_max"] for _, s in mine)}
    for direction in ("fwd", "bwd"):
      worst_run, worst = max(mine, key=lambda rs: np.nan_to_num(
          rs[1][f"composite_{direction}"]["value"], nan=-1.0))
      entry[f"max_composite_{direction}"] = worst[f"composite_{direction}"]["value"]
      entry[f"max_composite_{direction}_at"] = {
          "seed": worst_run.seed, "step": worst[f"composite_{direction}"]["step"],
          "layer": worst[f"composite_{direction}"]["layer"]}
    out[variant] = entry
  if "residual" in out:
    for entry in out.values():
      entry["gap_to_residual"] = entry["eval_loss_mean"] - out["residual"]["eval_loss_mean"]
  return out


def final_h_res(workdir: str) -> np.ndarray:
  """Token-averaged `H_res` of every connection layer, `(2 * num_layers, n, n)`, of the newest
  checkpoint in `workdir`, on the first validation batch (the diagnostics batch of training)."""
  cache = os.path.join(workdir, "h_res_final.npz")
  step = _latest_step(workdir)
  if os.path.exists(cache):
    saved = np.load(cache)
    if int(saved["step"]) == step:
      return saved["h_res"]
  model_cfg, params, data_dir = checkpoint.load_for_inference(workdir)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    train_cfg = ml_collections.ConfigDict(json.load(f))
  tokens = data.diagnostic_batch(data_dir, seq_len=train_cfg.seq_len,
                                 global_batch_size=train_cfg.batch_size)["inputs"]
  _, coeffs = jax.jit(lambda p, t: DecoderLM(model_cfg).apply(
      {"params": p}, t, return_coeffs=True))(params, jnp.asarray(tokens))
  h_res = np.asarray(jnp.mean(coeffs.h_res, axis=(1, 2)))
  np.savez(cache, h_res=h_res, step=step)
  return h_res
