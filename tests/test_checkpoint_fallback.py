"""A damaged checkpoint costs one interval, not the run: the loop falls back to the previous
checkpoint, deletes nothing, and names every failure when none restores."""

import logging
import shutil

import pytest

from mhc_jax.training import train
from tests import helpers

pytestmark = pytest.mark.usefixtures("compile_cache")


def _damage_arrays(checkpoint_dir):
  """Overwrites every array data file of a checkpoint's state with garbage of the same size."""
  files = [p for p in (checkpoint_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, f"no array files under {checkpoint_dir}"
  for path in files:
    path.write_bytes(b"\xde\xad" * (path.stat().st_size // 2 + 1))


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, cache_dir, caplog,
                                                                  smoke_run):
  """A damaged checkpoint costs one interval: the run resumes from the one before, keeps the
  damaged step on disk until it saves that step again, and ends as the undamaged run did."""
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir)
  assert helpers.checkpoint_steps(workdir) == [6, 12]
  _damage_arrays(workdir / "checkpoints" / "12")
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(helpers.smoke_config(cache_dir), str(workdir))
  assert any("checkpoint step 12" in r.getMessage() and "failed to restore" in r.getMessage()
             for r in caplog.records)
  assert helpers.resumed_step(caplog) == 6
  assert helpers.records(workdir) == helpers.records(smoke_run[0])
  assert helpers.checkpoint_steps(workdir) == [6, 12]  # step 12 saved anew over the damaged one


def test_no_restorable_checkpoint_is_a_clear_error(tmp_path, cache_dir, smoke_run):
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir)
  for step in (6, 12):
    _damage_arrays(workdir / "checkpoints" / str(step))
  with pytest.raises(ValueError, match=r"no checkpoint in .*checkpoints restores \(step 12: "):
    train.train_and_evaluate(helpers.smoke_config(cache_dir), str(workdir))
  assert helpers.checkpoint_steps(workdir) == [6, 12]  # nothing deleted
