"""Runs the stability study: `python -m launch.study --workdir=DIR [--config=configs/study.py]`.

Trains every (variant, seed) run of the study config in `DIR/<variant>/seed<k>/` (skipping finished
runs, resuming interrupted ones), then writes `DIR/summary.json`, `DIR/README.md` and
`DIR/study.png`. `--print_commands` prints one `launch.train` command per run instead (for a
cluster); run them, then this command again to summarise.
"""

import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs.loader import load_config
from launch.cli import QuietLibraries, make_parser
from mhc_jax.study import plan as study
from mhc_jax.study import report as study_report

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
  study.save_plan(cfg, study_dir)
  try:
    finished = study.run_study(runs)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if not finished:
    return
  paths = study_report.write_study(runs, study_dir, spike_factor=cfg.spike_factor,
                                   spike_window=cfg.spike_window)
  print("\n".join(f"wrote {p}" for p in paths))


if __name__ == "__main__":
  app.run(main, flags_parser=make_parser(_DEFAULT))
