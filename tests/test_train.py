"""End-to-end tests of the training loop: loss falls, exact kill/resume, SIGTERM, clear errors,
data parallelism on 8 fake CPU devices, and the sample/report entry points.

Runs go in-process through `train.train_and_evaluate` where they can (JAX is imported and warmed
once); a subprocess is used only where a real process is the point: SIGKILL, SIGTERM, the CLI's
error output, a fresh device count. Every run uses a stdlib corpus cached under pytest's tmp dir,
runs of the same config share compiled steps through a JAX compilation cache there too, and the
two reference runs are made once per session, even under pytest-xdist.
"""

import fcntl
import importlib.util
import json
import logging
import math
import os
from pathlib import Path
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import pytest

from launch import prepare_data
from mhc_jax import corpus
from mhc_jax import metrics
from mhc_jax import train

REPO = Path(__file__).resolve().parents[1]
SMOKE = "configs/default.py:smoke"
CHILD_TIMEOUT_S = 300
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The kill/resume and data-parallel runs: every step logged, checkpoints at 4, 8, 12, a batch
# that splits over 8 devices.
RESUME = {"batch_size": 8, "total_steps": 12, "checkpoint_every": 4, "log_every": 1}


def _load_default_config_module():
  spec = importlib.util.spec_from_file_location("_default_config", REPO / "configs/default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


DEFAULT_CONFIG = _load_default_config_module()


def _config(cache_dir, overrides=None, arg="smoke"):
  """The `configs/default.py:<arg>` config with dotted-name `overrides` and a hermetic cache."""
  config = DEFAULT_CONFIG.get_config(arg)
  config.data.cache_dir = str(cache_dir)
  for name, value in (overrides or {}).items():
    *parents, leaf = name.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _cli(workdir, cache_dir, overrides=None):
  """`python -m launch.train` argv equivalent to `_config(cache_dir, overrides)`."""
  flags = {"data.cache_dir": str(cache_dir), **(overrides or {})}
  return [sys.executable, "-m", "launch.train", f"--config={SMOKE}", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in flags.items())]


def _env(cache_dir, compile_cache=None, num_devices=None):
  env = dict(os.environ, MHC_JAX_CACHE=str(cache_dir), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if compile_cache is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = str(compile_cache)
  if num_devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  return env


def _run(argv, cache_dir, compile_cache=None, num_devices=None):
  return subprocess.run(argv, cwd=REPO, env=_env(cache_dir, compile_cache, num_devices),
                        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)


class _Child:
  """A subprocess logging to a file; a watcher thread sends it `sig` once `signal_when()` holds."""

  def __init__(self, argv, env, log_path, signal_when=None, sig=None):
    self.log_path = log_path
    self._log = open(log_path, "w")
    self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self._log,
                                 stderr=subprocess.STDOUT)
    self.signalled = threading.Event()
    self._watcher = None
    if signal_when is not None:
      self._watcher = threading.Thread(target=self._watch, args=(signal_when, sig), daemon=True)
      self._watcher.start()

  def _watch(self, predicate, sig):
    while self.proc.poll() is None:
      try:
        ready = predicate()
      except (OSError, ValueError):  # A file caught mid-rename or mid-write: look again.
        ready = False
      if ready:
        self.proc.send_signal(sig)
        self.signalled.set()
        return
      time.sleep(0.02)

  def wait(self):
    """The exit code (the child is killed if it runs past `CHILD_TIMEOUT_S`)."""
    try:
      return self.proc.wait(timeout=CHILD_TIMEOUT_S)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
        self.proc.wait()
      if self._watcher is not None:
        self._watcher.join()
      self._log.close()

  @property
  def output(self):
    return self.log_path.read_text()


def _records(workdir):
  """metrics.jsonl without the wall-clock throughput, the one value allowed to differ."""
  return [{k: v for k, v in r.items() if k != "tokens_per_s"}
          for r in metrics.read_metrics(workdir)]


def _checkpoint_steps(workdir):
  """Finalized checkpoint steps (Orbax writes `<step>.orbax-checkpoint-tmp...` first)."""
  ckpt_dir = Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _resumed_step(caplog):
  steps = [int(m.group(1)) for m in (re.search(r"resumed from step (\d+)", r.getMessage())
                                     for r in caplog.records) if m]
  assert len(steps) == 1, f"expected one 'resumed from step' log line, got {steps}"
  return steps[0]


def _session_dir(tmp_path_factory):
  """This session's tmp dir, shared by its pytest-xdist workers (each has a subdirectory)."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """A persistent JAX compilation cache for this module, in-process and for child processes.

  Shared by the workers; JAX treats an unreadable entry as a miss, so races cost a recompile.
  """
  path = _session_dir(tmp_path_factory) / "jax_compile_cache"
  path.mkdir(exist_ok=True)
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(path))
  compilation_cache.reset_cache()  # Takes effect even if this process compiled before.
  yield path
  jax.config.update("jax_compilation_cache_dir", old)
  compilation_cache.reset_cache()


def _shared_run(tmp_path_factory, cache_dir, name, overrides):
  """`(workdir, scalars)` of one in-process run of `_config(cache_dir, overrides)`, made once per
  session: the first worker to take the lock trains, the others wait. Tests only read it."""
  root = _session_dir(tmp_path_factory)
  workdir, done = root / name, root / f"{name}_scalars.json"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.is_file():
        shutil.rmtree(workdir, ignore_errors=True)
        scalars = train.train_and_evaluate(_config(cache_dir, overrides), str(workdir))
        done.write_text(json.dumps(scalars))
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return workdir, json.loads(done.read_text())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cache_dir, compile_cache):
  """The `:smoke` config as it is."""
  del compile_cache  # Only ordering: runs compile into the cache.
  return _shared_run(tmp_path_factory, cache_dir, "smoke_run", {})


@pytest.fixture(scope="module")
def resume_run(tmp_path_factory, cache_dir, compile_cache):
  """`:smoke` with `RESUME`, uninterrupted on this process's devices."""
  del compile_cache
  return _shared_run(tmp_path_factory, cache_dir, "resume_run", RESUME)


# --- 1. training works ---------------------------------------------------------------------------


def test_smoke_run_loss_falls(smoke_run):
  workdir, scalars = smoke_run
  config = DEFAULT_CONFIG.get_config("smoke")
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
  assert _checkpoint_steps(workdir) == [6, 12]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"] == DEFAULT_CONFIG.get_config("smoke").model.to_dict()
  assert (workdir / "report.png").read_bytes().startswith(PNG_MAGIC)


# --- 2. SIGKILL and resume is exact --------------------------------------------------------------


def test_kill_and_resume_is_bit_identical(tmp_path, cache_dir, caplog, request):
  # Run B: the CLI, SIGKILLed once checkpoint 4 is finalized. It compiles its own steps (no
  # compilation cache): compiling the eval step at step 6 keeps it busy for seconds after
  # checkpoint 4, so the kill lands mid-run.
  killed = _Child(_cli(tmp_path / "b", cache_dir, RESUME), _env(cache_dir), tmp_path / "b.log",
                  signal_when=lambda: 4 in _checkpoint_steps(tmp_path / "b"), sig=signal.SIGKILL)
  # Meanwhile run A, the same config uninterrupted (or wait for another worker making it).
  expected = _records(request.getfixturevalue("resume_run")[0])
  assert [r["step"] for r in expected] == list(range(1, 13))

  returncode = killed.wait()
  assert killed.signalled.is_set(), f"run B ended before checkpoint 4:\n{killed.output[-3000:]}"
  assert returncode == -signal.SIGKILL, killed.output[-3000:]
  killed_at = _checkpoint_steps(tmp_path / "b")[-1]
  assert 4 <= killed_at < 12, "run B finished before it was killed"

  # Run B again, to the end: it resumes and logs exactly what A logged.
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(_config(cache_dir, RESUME), str(tmp_path / "b"))
  assert _resumed_step(caplog) == killed_at
  assert _records(tmp_path / "b") == expected  # every step, every value, bit for bit


# --- 3. SIGTERM (preemption) ---------------------------------------------------------------------


def test_sigterm_checkpoints_exits_zero_and_resumes(tmp_path, cache_dir, compile_cache):
  long_run = {"total_steps": 100_000, "log_every": 1, "eval_every": 10_000,
              "diag_every": 10_000, "checkpoint_every": 10_000}
  workdir = tmp_path / "run"
  argv, env = _cli(workdir, cache_dir, long_run), _env(cache_dir, compile_cache)

  def logged_past(step):
    path = workdir / metrics.METRICS_FILE
    return path.is_file() and any(r["step"] > step for r in metrics.read_metrics(workdir))

  first = _Child(argv, env, tmp_path / "first.log", signal_when=lambda: logged_past(0),
                 sig=signal.SIGTERM)
  assert first.wait() == 0, first.output[-3000:]
  assert first.signalled.is_set()
  saved = _checkpoint_steps(workdir)
  assert len(saved) == 1 and 1 <= saved[0] < long_run["total_steps"], saved
  stopped_at = saved[0]
  logged = metrics.read_metrics(workdir)
  assert [r["step"] for r in logged] == list(range(1, stopped_at + 1))

  # The same command again resumes there, and stops at a later step on the next SIGTERM.
  second = _Child(argv, env, tmp_path / "second.log",
                  signal_when=lambda: logged_past(stopped_at), sig=signal.SIGTERM)
  assert second.wait() == 0, second.output[-3000:]
  assert second.signalled.is_set()
  assert f"resumed from step {stopped_at} " in second.output
  latest = _checkpoint_steps(workdir)[-1]
  assert _checkpoint_steps(workdir) == [stopped_at, latest] and latest > stopped_at
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
    train.train_and_evaluate(_config(cache_dir), str(tmp_path))
  finally:
    signal.signal(signal.SIGTERM, previous)
  saved = _checkpoint_steps(tmp_path)
  assert len(saved) == 1 and signal_at_step <= saved[0] < 12, saved
  assert not (tmp_path / "report.png").exists()  # stopped early: no final report


# --- 4. bad input: a clear error, no traceback ---------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    ({"data.dir": "/nonexistent"}, "'/nonexistent' does not exist"),
    ({"model.n_streams": 0}, "model.n_streams=0 is invalid"),
    ({"model.d_modle": 64},
     "--config.model.d_modle: config.model has no field 'd_modle'; did you mean "
     "--config.model.d_model?"),
    ({"optimiser.lr": 0.1}, "config has no field 'optimiser'; did you mean --config.optimizer?"),
], ids=["missing_data_dir", "n_streams_0", "misspelt_field", "misspelt_section"])
def test_cli_bad_input_is_one_clear_line(tmp_path, cache_dir, overrides, message):
  proc = _run(_cli(tmp_path / "run", cache_dir, overrides), cache_dir)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1, proc.stderr[-3000:]
  assert message in error_lines[0]
  assert _checkpoint_steps(tmp_path / "run") == []


def _empty_corpus(tmp_path):
  corpus.write_corpus(tmp_path / "empty", {"train": [], "val": []}, vocab_size=256,
                      tokenizer="bytes", source="empty")
  return str(tmp_path / "empty")


def _tiny_corpus(tmp_path):
  """A prepared byte corpus with 5000 train and ~250 val tokens (the tail of one file)."""
  text = tmp_path / "tiny.txt"
  text.write_text("".join(f"line {i:04d} of a tiny corpus\n" for i in range(190)))
  meta = prepare_data.prepare([str(text)], tmp_path / "tiny", val_fraction=0.05)
  assert 64 < meta.num_tokens["val"] < 400 < meta.num_tokens["train"]
  return str(tmp_path / "tiny")


@pytest.mark.parametrize("make_overrides,message", [
    (lambda tmp: {"data.dir": "/nonexistent"}, "data_dir='/nonexistent' does not exist"),
    (lambda tmp: {"data.dir": str(tmp)}, "has no meta.json"),
    (lambda tmp: {"data.dir": _empty_corpus(tmp)}, r"longer than the train split .*\(0 tokens"),
    (lambda tmp: {"data.dir": _tiny_corpus(tmp), "seq_len": 512},
     r"seq_len=512 is longer than the val split"),
    (lambda tmp: {"data.dir": _tiny_corpus(tmp), "seq_len": 128},
     r"global_batch_size=4 is more than the \d windows .* val split"),
    (lambda tmp: {"model.n_streams": 0}, r"model\.n_streams=0 is invalid"),
    (lambda tmp: {"model.d_model": 30, "model.num_heads": 4},
     r"model\.d_model=30 is invalid: must be divisible by num_heads=4"),
    (lambda tmp: {"model.connection": "dense"}, r"model\.connection='dense' is invalid"),
    (lambda tmp: {"model.num_kv_heads": 3}, r"model\.num_kv_heads=3 is invalid"),
    (lambda tmp: {"total_steps": 0}, r"config\.total_steps=0 is invalid"),
    (lambda tmp: {"batch_size": -4}, r"config\.batch_size=-4 is invalid"),
    (lambda tmp: {"log_every": 0}, r"config\.log_every=0 is invalid"),
    (lambda tmp: {"mesh.model": 3}, r"mesh\.model=3 must be >= 1 and divide"),
    (lambda tmp: {"optimizer.schedule": "linear"}, r"optimizer\.schedule='linear' is invalid"),
], ids=["missing_dir", "not_a_corpus", "empty_corpus", "seq_len_over_val", "val_under_batch",
        "n_streams_0", "d_model_vs_heads", "connection", "kv_heads", "total_steps_0",
        "batch_size_negative", "log_every_0", "mesh_model", "schedule"])
def test_bad_config_raises_value_error(tmp_path, cache_dir, make_overrides, message):
  config = _config(cache_dir, make_overrides(tmp_path))
  with pytest.raises(ValueError, match=message) as info:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  raised_in = Path(info.traceback[-1].path).resolve()
  assert raised_in.is_relative_to(REPO / "mhc_jax"), f"raised in {raised_in}, not by mhc_jax"
  assert _checkpoint_steps(tmp_path / "run") == []


def test_workdir_of_another_model_is_refused_and_kept(tmp_path, cache_dir, smoke_run):
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir)
  before = {p.relative_to(workdir): p.stat().st_mtime_ns for p in workdir.rglob("*")
            if p.is_file() and "tensorboard" not in p.parts}
  with pytest.raises(ValueError, match=r"model\.d_model: checkpoint 32 vs now 64") as info:
    train.train_and_evaluate(_config(cache_dir, {"model.d_model": 64}), str(workdir))
  assert "num_layers" not in str(info.value)  # only the field that differs is named
  after = {p.relative_to(workdir): p.stat().st_mtime_ns for p in workdir.rglob("*")
           if p.is_file() and "tensorboard" not in p.parts}
  assert after == before  # checkpoints, metrics.jsonl and config.json untouched
  assert _checkpoint_steps(workdir) == [6, 12]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
  # An absurd learning rate: step 1 is finite (init params), step 2 overflows.
  config = _config(cache_dir, {"optimizer.lr": 1e30, "optimizer.warmup_steps": 0,
                               "checkpoint_every": 1, "log_every": 1})
  with pytest.raises(train.NonFiniteLossError, match=r"train_loss is (nan|inf) at step 2"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert _checkpoint_steps(tmp_path / "run") == [1]
  assert [r["step"] for r in metrics.read_metrics(tmp_path / "run")] == [1]


# --- 5. data parallelism on 8 fake CPU devices ---------------------------------------------------


def test_eight_device_data_parallel_matches_one_device(tmp_path, cache_dir, request):
  eight = _Child(_cli(tmp_path / "eight", cache_dir, RESUME), _env(cache_dir, num_devices=8),
                 tmp_path / "eight.log")
  # Meanwhile the same run on one device.
  if jax.device_count() == 1:
    one_workdir = request.getfixturevalue("resume_run")[0]
  else:  # This worker has more devices: a fresh one-device process.
    one_workdir = tmp_path / "one"
    one = _run(_cli(one_workdir, cache_dir, RESUME), cache_dir, num_devices=1)
    assert one.returncode == 0, one.stderr[-3000:]
  assert eight.wait() == 0, eight.output[-3000:]
  device_lines = [line for line in eight.output.splitlines() if "devices: [" in line]
  assert len(device_lines) == 1, eight.output[-3000:]
  assert len(re.findall(r"id=\d+", device_lines[0])) == 8, device_lines[0]

  on_eight, on_one = _records(tmp_path / "eight"), _records(one_workdir)
  assert [r["step"] for r in on_eight] == [r["step"] for r in on_one] == list(range(1, 13))
  # Only the order of the batch reductions differs: float32 rounding.
  np.testing.assert_allclose([r["train_loss"] for r in on_eight],
                             [r["train_loss"] for r in on_one], rtol=1e-5)
  np.testing.assert_allclose([r["eval_loss"] for r in on_eight if "eval_loss" in r],
                             [r["eval_loss"] for r in on_one if "eval_loss" in r], rtol=1e-5)


# --- 7. sampling and the report ------------------------------------------------------------------


def test_launch_sample_prints_text(smoke_run, cache_dir):
  prompt = "def "
  proc = _run([sys.executable, "-m", "launch.sample", f"--workdir={smoke_run[0]}",
               f"--prompt={prompt}", "--max_new_tokens=16", "--temperature=0"], cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith(prompt)
  assert len(proc.stdout.rstrip("\n")) > len(prompt)  # 16 bytes decode to at least 4 chars


def test_launch_report_writes_png(smoke_run, tmp_path, cache_dir):
  out = tmp_path / "report.png"
  proc = _run([sys.executable, "-m", "launch.report", f"--workdir={smoke_run[0]}",
               f"--out={out}"], cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == str(out)
  assert out.read_bytes().startswith(PNG_MAGIC)
