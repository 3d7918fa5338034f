"""Elastic resume: a checkpoint saved on one mesh or process count resumes on another.

Each test trains the 12-step `helpers.RESUME` run once, uninterrupted, then resumes copies of its
workdir, cut back to an earlier checkpoint, under another layout. The global batch order is the
same in every layout, so the resumed losses must equal the uninterrupted run's. Only the order of
float32 reductions changes with the layout (rtol 1e-5); a data position that did not carry over
would feed step 5 another batch and miss by far more.
"""

import json
from pathlib import Path
import shutil
import socket
import subprocess

import numpy as np
import pytest

from configs import default
from mhc_jax.training import checkpoint
from tests import helpers

pytestmark = pytest.mark.usefixtures("compile_cache")


def _resume_copy(workdir: Path, step: int, dest: Path) -> Path:
  """A copy of `workdir` whose newest checkpoint is `step` (the later ones removed)."""
  shutil.copytree(workdir, dest)
  for later in (s for s in helpers.checkpoint_steps(dest) if s > step):
    shutil.rmtree(dest / "checkpoints" / str(later))
  return dest


def _train(workdir, cache_dir, overrides=None, num_devices=1, num_processes=1) -> list[str]:
  """Runs `launch.train` with `helpers.RESUME` on `num_processes` local processes; returns their
  logs."""
  argv = helpers.train_argv(workdir, cache_dir, {**helpers.RESUME, **(overrides or {})})
  if num_processes > 1:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    argv += ["--multihost", f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={num_processes}"]
  procs = [subprocess.Popen(argv + ([f"--process_id={i}"] if num_processes > 1 else []),
                            cwd=helpers.REPO, text=True,
                             env=helpers.child_env(cache_dir, num_devices=num_devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(num_processes)]
  logs = [p.communicate(timeout=helpers.CHILD_TIMEOUT_S)[0] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} of {workdir} failed:\n{log[-3000:]}"
  return logs


def _assert_same_trajectory(resumed, source, reference, resumed_at: int):
  """`resumed` (a copy of `source` cut back to `resumed_at`) kept `source`'s earlier lines and
  continued `reference`'s losses."""
  got, want = helpers.records(resumed), helpers.records(reference)
  assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 13))
  assert got[:resumed_at] == helpers.records(source)[:resumed_at]
  for key in ("train_loss", "eval_loss"):
    np.testing.assert_allclose([r[key] for r in got if key in r],
                               [r[key] for r in want if key in r], rtol=1e-5, err_msg=key)


def test_resume_on_another_mesh(tmp_path, cache_dir):
  """8 fake devices: saved under `fsdp 8`, resumed under `stage 2 x fsdp 2 x model 2`, which
  trains through the pipeline (GPipe, 2 microbatches)."""
  reference = tmp_path / "fsdp8"
  _train(reference, cache_dir, {"mesh.fsdp": 8}, num_devices=8)
  resumed = _resume_copy(reference, 4, tmp_path / "resumed")
  log, = _train(resumed, cache_dir, {"mesh.stage": 2, "mesh.fsdp": 2, "mesh.model": 2,
                                     "pipeline.microbatches": 2}, num_devices=8)
  assert "resumed from step 4 " in log and "pipeline: 2 stages" in log, log[-3000:]
  _assert_same_trajectory(resumed, reference, reference, 4)


def test_resume_from_one_process_on_two_and_back(tmp_path, cache_dir):
  """1 process -> 2 processes (`jax.distributed` on 127.0.0.1) -> 1 process."""
  reference = tmp_path / "one"
  _train(reference, cache_dir)
  two = _resume_copy(reference, 4, tmp_path / "two")
  logs = _train(two, cache_dir, num_processes=2)
  assert all("resumed from step 4 " in log for log in logs), logs[0][-3000:]
  assert sorted(p.name for p in (two / "checkpoints/8/data_iter").glob("*.json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  _assert_same_trajectory(two, reference, reference, 4)

  back = _resume_copy(two, 8, tmp_path / "back")
  log, = _train(back, cache_dir)
  assert "resumed from step 8 " in log, log[-3000:]
  _assert_same_trajectory(back, two, reference, 8)


class _Iterator:
  def __init__(self):
    self.state = None

  def set_state(self, state):
    self.state = state

  def start_prefetch(self):
    pass


def _saved_positions(step_dir: Path, positions: dict[str, int]) -> Path:
  (step_dir / "data_iter").mkdir(parents=True)
  for name, index in positions.items():
    (step_dir / "data_iter" / name).write_text(json.dumps({"next_index": index}))
  return step_dir


def test_data_position_from_another_process_count(tmp_path):
  step_dir = _saved_positions(tmp_path, {"process_0-of-2.json": 8, "process_1-of-2.json": 8})
  it = _Iterator()
  checkpoint.restore_data_position(step_dir, it)  # this test runs as 1 process
  assert it.state == {"next_index": 8}


def test_disagreeing_data_positions_are_refused(tmp_path):
  step_dir = _saved_positions(tmp_path, {"process_0-of-2.json": 8, "process_1-of-2.json": 9})
  with pytest.raises(ValueError, match="process count that saved it"):
    checkpoint.restore_data_position(step_dir, _Iterator())


def test_a_changed_batch_order_is_warned(caplog):
  config = default.get_config("smoke")
  saved = {**config.to_dict(), "batch_size": config.batch_size * 2}
  checkpoint._warn_if_data_order_changes(config.to_dict(), config, 4)  # pylint: disable=protected-access
  assert not caplog.records
  checkpoint._warn_if_data_order_changes(saved, config, 4)  # pylint: disable=protected-access
  assert f"batch_size: checkpoint {config.batch_size * 2} vs now {config.batch_size}" in caplog.text
