r"""Plots a training run's metrics (loss, Amax gains, stability) into one PNG.

  python -m launch.report --workdir=runs/mhc_small [--out=report.png]

writes `runs/mhc_small/report.png` (or `--out`) and prints its path; see `mhc_jax/report.py`.
"""

from collections.abc import Sequence

from absl import app
from absl import flags

from mhc_jax.training import report

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory holding metrics.jsonl.")
_OUT = flags.DEFINE_string("out", None, "PNG to write; default <workdir>/report.png.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass everything as flags.")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: the directory of a training run.")
  print(report.write_report(_WORKDIR.value, _OUT.value))


if __name__ == "__main__":
  app.run(main)
