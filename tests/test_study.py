"""The stability study: run planning, printed commands, spike counting, the summary, and the
end-to-end `launch.study` (skips finished runs, resumes interrupted ones)."""

import json
import os
from pathlib import Path
import shlex
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs.loader import load_config
from mhc_jax.study import plan as study
from mhc_jax.training.metrics import MetricsWriter, read_metrics

REPO = Path(__file__).resolve().parents[1]
SMOKE = "configs/study.py:smoke"


def _env(cache_dir):
  env = dict(os.environ, MHC_JAX_CACHE=str(cache_dir), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def _study(workdir, cache_dir, *extra):
  return subprocess.run(
      [sys.executable, "-m", "launch.study", f"--config={SMOKE}", f"--workdir={workdir}",
       *extra], cwd=REPO, env=_env(cache_dir), capture_output=True, text=True, timeout=600,
      check=False)


def test_count_spikes():
  g = np.array([1.0, 1.1, 0.9, 1.0, 5.0, 1.0, 0.95, 2.5, 1.0])
  assert study.count_spikes(g, factor=2.0, window=3) == 2  # 5.0 and 2.5 (> 2 x median 1.0)
  assert study.count_spikes(g, factor=6.0, window=3) == 0
  assert study.count_spikes(g[:3], factor=2.0, window=3) == 0  # warm-up only


def _fake_run(root, variant, seed, evals, composite_fwd):
  """A run dir whose metrics.jsonl logs `evals[k]` and per-layer gains at steps 10, 20, ..."""
  run = study.Run(variant, seed, str(root / variant / f"seed{seed}"),
                  ml_collections.ConfigDict({"seed": seed}))
  with MetricsWriter(run.workdir) as writer:
    for k, (loss, gains) in enumerate(zip(evals, composite_fwd)):
      writer.write(10 * (k + 1), {"eval_loss": loss, "grad_norm": 1.0},
                   {"diag/composite_fwd_avg": gains, "diag/composite_bwd_avg": gains})
  return run


def test_summary_numbers(tmp_path):
  runs = [_fake_run(tmp_path, "residual", 0, [3.0, 2.0], [[1, 1], [1, 1]]),
          _fake_run(tmp_path, "residual", 1, [3.0, 2.2], [[1, 1], [1, 1]]),
          _fake_run(tmp_path, "hc", 0, [3.0, 1.9], [[1, 7.0], [1, 3.0]]),
          _fake_run(tmp_path, "hc", 1, [3.0, 2.0], [[40.0, 1], [2.0, 1]])]
  summary = study.summarize(runs, spike_factor=2.0, spike_window=1)
  assert summary["residual"]["eval_loss_mean"] == pytest.approx(2.1)
  assert summary["residual"]["eval_loss_std"] == pytest.approx(np.std([2.0, 2.2], ddof=1))
  assert summary["hc"]["gap_to_residual"] == pytest.approx(1.95 - 2.1)
  assert summary["hc"]["max_composite_fwd"] == 40.0
  assert summary["hc"]["max_composite_fwd_at"] == {"seed": 1, "step": 10, "layer": 0}
  assert summary["hc"]["seeds"] == [0, 1]


def test_plan_runs_rejects_unknown_variants(tmp_path):
  cfg = load_config(SMOKE)
  cfg.variants = "residual,mhc_fast"
  with pytest.raises(ValueError, match=r"config.variants='residual,mhc_fast' is invalid"):
    study.plan_runs(cfg, str(tmp_path))


def test_printed_flags_rebuild_each_run_config(tmp_path):
  """`override_flags` on configs/default.py gives back exactly each run's config."""
  base = load_config("configs/default.py")
  for run in study.plan_runs(load_config("configs/study.py"), str(tmp_path)):
    rebuilt = load_config("configs/default.py")
    for flag in study.override_flags(run.config, base):
      path, value = flag[len("--config."):].split("=", 1)
      *parents, leaf = path.split(".")
      node = rebuilt
      for p in parents:
        node = node[p]
      node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
    assert rebuilt.to_dict() == run.config.to_dict(), run.workdir


def _records_without_timing(workdir):
  return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(workdir)]


@pytest.mark.slow
def test_study_end_to_end(tmp_path, cache_dir):
  first = _study(tmp_path, cache_dir)
  assert first.returncode == 0, first.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert list(summary) == list(study.VARIANTS)
  for entry in summary.values():
    assert np.isfinite(entry["eval_loss_mean"]) and entry["final_step"] == 8
  # Doubly stochastic H_res: every composite gain of mHC and mHC-lite is 1.
  for variant in ("mhc", "mhc_lite"):
    assert abs(summary[variant]["max_composite_fwd"] - 1) < 1e-4
  assert "| hc |" in (tmp_path / "README.md").read_text()
  assert (tmp_path / "study.png").read_bytes().startswith(b"\x89PNG")

  # An interrupted run (its last checkpoint gone) resumes; the finished ones are skipped.
  hc = tmp_path / "hc" / "seed0"
  before = _records_without_timing(hc)
  shutil.rmtree(hc / "checkpoints" / "8")
  again = _study(tmp_path, cache_dir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("finished, skipped") == 3, again.stdout
  assert "resumed from step 4" in again.stderr
  assert _records_without_timing(hc) == before

  # A printed command trains the same run as the study did.
  printed = _study(tmp_path, cache_dir, "--print_commands")
  assert printed.returncode == 0, printed.stderr[-3000:]
  commands = printed.stdout.strip().splitlines()
  assert len(commands) == 4
  hc_command = shlex.split(next(c for c in commands if "/hc/seed0" in c))
  alone = tmp_path / "alone"
  hc_command = [a if not a.startswith("--workdir=") else f"--workdir={alone}"
                for a in hc_command]
  done = subprocess.run(hc_command, cwd=REPO, env=_env(cache_dir), capture_output=True,
                        text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert _records_without_timing(alone) == before


def test_a_diverged_run_is_a_result_not_a_failure(tmp_path, cache_dir):
  cfg = load_config(SMOKE)
  cfg.variants = "residual,hc"
  cfg.train.data.cache_dir = str(cache_dir)
  runs = study.plan_runs(cfg, str(tmp_path))
  hc = runs[1]
  hc.config.optimizer.lr, hc.config.optimizer.warmup_steps = 1e30, 0  # step 2 overflows
  assert study.run_study(runs, log=lambda _: None)
  assert "at step 2" in (Path(hc.workdir) / study.DIVERGED_FILE).read_text()
  assert study.is_finished(hc)
  summary = study.summarize(runs, spike_factor=2.0, spike_window=3)
  assert summary["hc"]["diverged_seeds"] == [0] and np.isnan(summary["hc"]["eval_loss_mean"])
  assert summary["residual"]["diverged_seeds"] == [] and np.isfinite(
      summary["residual"]["eval_loss_mean"])
