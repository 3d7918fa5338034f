"""Interrupted runs: a SIGKILLed run resumes bit-identically; SIGTERM checkpoints, exits 0 and
resumes, at any point of a step."""

import logging
import os
import signal

import pytest

from mhc_jax.training import metrics, train
from tests import helpers


pytestmark = pytest.mark.usefixtures("compile_cache")


# --- SIGKILL and resume is exact --------------------------------------------------------------


def test_kill_and_resume_is_bit_identical(tmp_path, cache_dir, caplog, request):
  # Run B: the CLI, SIGKILLed once checkpoint 4 is finalized. It compiles its own steps (no
  # compilation cache): compiling the eval step at step 6 keeps it busy for seconds after
  # checkpoint 4, so the kill lands mid-run.
  killed = helpers.Child(
      helpers.train_argv(tmp_path / "b", cache_dir, helpers.RESUME), helpers.child_env(cache_dir),
      tmp_path / "b.log", signal_when=lambda: 4 in helpers.checkpoint_steps(tmp_path / "b"),
      sig=signal.SIGKILL)
  # Meanwhile run A, the same config uninterrupted (or wait for another worker making it).
  expected = helpers.records(request.getfixturevalue("resume_run")[0])
  assert [r["step"] for r in expected] == list(range(1, 13))

  returncode = killed.wait()
  assert killed.signalled.is_set(), f"run B ended before checkpoint 4:\n{killed.output[-3000:]}"
  assert returncode == -signal.SIGKILL, killed.output[-3000:]
  killed_at = helpers.checkpoint_steps(tmp_path / "b")[-1]
  assert 4 <= killed_at < 12, "run B finished before it was killed"

  # Run B again, to the end: it resumes and logs exactly what A logged.
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(helpers.smoke_config(cache_dir, helpers.RESUME), str(tmp_path / "b"))
  assert helpers.resumed_step(caplog) == killed_at
  assert helpers.records(tmp_path / "b") == expected  # every step, every value, bit for bit



# --- SIGTERM (preemption) ---------------------------------------------------------------------


def test_sigterm_checkpoints_exits_zero_and_resumes(tmp_path, cache_dir, compile_cache):
  long_run = {"total_steps": 100_000, "log_every": 1, "eval_every": 10_000,
              "diag_every": 10_000, "checkpoint_every": 10_000}
  workdir = tmp_path / "run"
  argv = helpers.train_argv(workdir, cache_dir, long_run)
  env = helpers.child_env(cache_dir, compile_cache)

  def logged_past(step):
    path = workdir / metrics.METRICS_FILE
    return path.is_file() and any(r["step"] > step for r in metrics.read_metrics(workdir))

  first = helpers.Child(argv, env, tmp_path / "first.log", signal_when=lambda: logged_past(0),
                        sig=signal.SIGTERM)
  assert first.wait() == 0, first.output[-3000:]
  assert first.signalled.is_set()
  saved = helpers.checkpoint_steps(workdir)
  assert len(saved) == 1 and 1 <= saved[0] < long_run["total_steps"], saved
  stopped_at = saved[0]
  logged = metrics.read_metrics(workdir)
  assert [r["step"] for r in logged] == list(range(1, stopped_at + 1))

  # The same command again resumes there, and stops at a later step on the next SIGTERM.
  second = helpers.Child(argv, env, tmp_path / "second.log",
                         signal_when=lambda: logged_past(stopped_at), sig=signal.SIGTERM)
  assert second.wait() == 0, second.output[-3000:]
  assert second.signalled.is_set()
  assert f"resumed from step {stopped_at} " in second.output
  latest = helpers.checkpoint_steps(workdir)[-1]
  assert helpers.checkpoint_steps(workdir) == [stopped_at, latest] and latest > stopped_at
  resumed = metrics.read_metrics(workdir)
  assert resumed[:stopped_at] == logged
  assert [r["step"] for r in resumed] == list(range(1, latest + 1))


def test_sigterm_at_any_point_of_a_step_leaves_a_checkpoint(tmp_path, cache_dir, monkeypatch):
  """SIGTERM landing late in a step (here while its metrics record is made) still checkpoints."""
  signal_at_step = 4  # A logged step that is neither an eval nor a checkpoint step of :smoke.
  make_schedule = train.optim.make_schedule

  def make_signalling_schedule(*args):
    schedule = make_schedule(*args)

    def signalling_schedule(count):
      if isinstance(count, int) and count == signal_at_step - 1:  # The loop's `lr` of the step.
        os.kill(os.getpid(), signal.SIGTERM)
      return schedule(count)
    return signalling_schedule

  monkeypatch.setattr(train.optim, "make_schedule", make_signalling_schedule)
  # Were the loop not to catch SIGTERM, this handler keeps the test process alive.
  previous = signal.signal(signal.SIGTERM, lambda *_: None)
  try:
    train.train_and_evaluate(helpers.smoke_config(cache_dir), str(tmp_path))
  finally:
    signal.signal(signal.SIGTERM, previous)
  saved = helpers.checkpoint_steps(tmp_path)
  assert len(saved) == 1 and signal_at_step <= saved[0] < 12, saved
  assert not (tmp_path / "report.png").exists()  # stopped early: no final report
