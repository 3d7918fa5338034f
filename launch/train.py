"""Trains a language model: `python -m launch.train --config=configs/default.py --workdir=DIR`.

Re-running the same command resumes from the latest checkpoint in DIR. `--multihost` calls
`jax.distributed.initialize()` first (on TPU pods and SLURM it finds its peers by itself; pass
the coordinator flags elsewhere).
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from launch.cli import QuietLibraries, make_parser
from mhc_jax.training import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Run config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<config name>).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  del argv
  logging.get_absl_logger().addFilter(QuietLibraries())
  if _MULTIHOST.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config_path = flags.FLAGS["config"].config_filename
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  workdir = _WORKDIR.value or os.path.join("runs", name)
  os.makedirs(workdir, exist_ok=True)
  logging.info("workdir: %s", os.path.abspath(workdir))
  try:
    scalars = train.train_and_evaluate(_CONFIG.value, workdir)
  except (ValueError, train.NonFiniteLossError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  summary = ", ".join(f"{k}={scalars[k]:.4f}" for k in ("train_loss", "eval_loss") if k in scalars)
  print(f"done: {workdir} {summary}")


if __name__ == "__main__":
  app.run(main, flags_parser=make_parser("configs/default.py"))
