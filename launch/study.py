"""Runs the stability study: `python -m launch.study --workdir=DIR [--config=configs/study.py]`.

Trains every (variant, seed) run of the study config in `DIR/<variant>/seed<k>/` (skipping finished
runs, resuming interrupted ones), then writes `DIR/summary.json`, `DIR/README.md` and
`DIR/study.png`. `--print_commands` prints one `launch.train` command per run instead (for a
cluster); run them, then this command again to summarise.
"""

import json
import os
import shlex
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from launch.cli import QuietLibraries, load_config, make_parser
from mhc_jax import study, study_report, train

_DEFAULT = "configs/study.py"
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Study config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/study", "Study directory.")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print one launch.train command per run.")


def _train_command(run: study.Run) -> str:
  overrides = study.override_flags(run.config, load_config("configs/default.py"))
  return shlex.join([sys.executable, "-m", "launch.train", "--config=configs/default.py",
                     f"--workdir={run.workdir}", *overrides])


def main(argv):
  del argv
  logging.get_absl_logger().addFilter(QuietLibraries())
  cfg, study_dir = _CONFIG.value, _WORKDIR.value
  try:
    runs = study.plan_runs(cfg, study_dir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if _PRINT.value:
    print("\n".join(_train_command(r) for r in runs))
    return
  os.makedirs(study_dir, exist_ok=True)
  with open(os.path.join(study_dir, "study_config.json"), "w", encoding="utf-8") as f:
    json.dump(cfg.to_dict(), f, indent=2)
  for k, run in enumerate(runs, 1):
    if study.is_finished(run):
      print(f"[{k}/{len(runs)}] {run.workdir}: finished, skipped")
      continue
    print(f"[{k}/{len(runs)}] {run.workdir}: training {run.variant}, seed {run.config.seed}")
    start = time.perf_counter()
    try:
      train.train_and_evaluate(run.config, run.workdir)
    except (ValueError, train.NonFiniteLossError) as e:
      print(f"error: {run.workdir}: {e}", file=sys.stderr)
      sys.exit(1)
    if not study.is_finished(run):  # SIGTERM: the run saved a checkpoint and returned
      print(f"{run.workdir} stopped early; rerun the same command to resume.", file=sys.stderr)
      return
    print(f"[{k}/{len(runs)}] {run.workdir}: {time.perf_counter() - start:.0f} s")
  paths = study_report.write_study(runs, study_dir, spike_factor=cfg.spike_factor,
                                   spike_window=cfg.spike_window)
  print("\n".join(f"wrote {p}" for p in paths))


if __name__ == "__main__":
  app.run(main, flags_parser=make_parser(_DEFAULT))
