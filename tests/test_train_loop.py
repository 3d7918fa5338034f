"""End-to-end training: the smoke run's loss falls and it writes what it should; 8-device data
parallelism equals one device."""

import json
import math
import re

import jax
import numpy as np
import pytest

from mhc_jax.training import metrics
from tests import helpers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("compile_cache")


# --- training works ---------------------------------------------------------------------------


def test_smoke_run_loss_falls(smoke_run):
  workdir, scalars = smoke_run
  config = helpers.smoke_config("")
  records = metrics.read_metrics(workdir)
  steps = [r["step"] for r in records]
  assert steps == list(range(config.log_every, config.total_steps + 1, config.log_every))
  losses = [r["train_loss"] for r in records]
  assert all(math.isfinite(x) for x in losses)
  # A byte LM starts near ln(256) = 5.5 nats; 12 smoke steps reach about 3.7.
  assert losses[-1] < losses[0] - 1.0, losses
  assert losses[-1] < math.log(256) - 1.0, losses
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert len(evals) == config.total_steps // config.eval_every
  assert all(math.isfinite(x) for x in evals)
  assert scalars["train_loss"] == losses[-1]
  final = records[-1]
  assert len(final["diag/composite_fwd_avg"]) == 2 * config.model.num_layers
  assert helpers.checkpoint_steps(workdir) == [6, 12]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"] == helpers.smoke_config("").model.to_dict()
  assert (workdir / "report.png").read_bytes().startswith(PNG_MAGIC)



# --- data parallelism on 8 fake CPU devices ---------------------------------------------------


def test_eight_device_data_parallel_matches_one_device(tmp_path, cache_dir, request):
  eight = helpers.Child(helpers.train_argv(tmp_path / "eight", cache_dir, helpers.RESUME),
                        helpers.child_env(cache_dir, num_devices=8), tmp_path / "eight.log")
  # Meanwhile the same run on one device.
  if jax.device_count() == 1:
    one_workdir = request.getfixturevalue("resume_run")[0]
  else:  # This worker has more devices: a fresh one-device process.
    one_workdir = tmp_path / "one"
    one = helpers.run(helpers.train_argv(one_workdir, cache_dir, helpers.RESUME), cache_dir,
                      num_devices=1)
    assert one.returncode == 0, one.stderr[-3000:]
  assert eight.wait() == 0, eight.output[-3000:]
  device_lines = [line for line in eight.output.splitlines() if "devices: [" in line]
  assert len(device_lines) == 1, eight.output[-3000:]
  assert len(re.findall(r"id=\d+", device_lines[0])) == 8, device_lines[0]

  on_eight, on_one = helpers.records(tmp_path / "eight"), helpers.records(one_workdir)
  assert [r["step"] for r in on_eight] == [r["step"] for r in on_one] == list(range(1, 13))
  # Only the order of the batch reductions differs: float32 rounding.
  np.testing.assert_allclose([r["train_loss"] for r in on_eight],
                             [r["train_loss"] for r in on_one], rtol=1e-5)
  np.testing.assert_allclose([r["eval_loss"] for r in on_eight if "eval_loss" in r],
                             [r["eval_loss"] for r in on_one if "eval_loss" in r], rtol=1e-5)
