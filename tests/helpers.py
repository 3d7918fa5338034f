"""What several test modules share: the smoke config, child processes (with N fake CPU devices,
or a CLI run logging to a file), and readers of a run directory.

Test modules import from here, never from each other; the fixtures built on these live in
`conftest.py`.
"""

import json
import os
from pathlib import Path
import re
import subprocess
import sys
import threading
import time

from configs import loader
from mhc_jax.training import metrics

REPO = Path(__file__).resolve().parents[1]
SMOKE = "configs/default.py:smoke"
CHILD_TIMEOUT_S = 300
# The kill/resume and data-parallel runs: every step logged, checkpoints at 4, 8, 12, a batch
# that splits over 8 devices.
RESUME = {"batch_size": 8, "total_steps": 12, "checkpoint_every": 4, "log_every": 1}


def smoke_config(cache_dir, overrides=None, arg="smoke"):
  """The `configs/default.py:<arg>` config with dotted-name `overrides` and a hermetic cache."""
  config = loader.load_config(f"configs/default.py:{arg}")
  config.data.cache_dir = str(cache_dir)
  for name, value in (overrides or {}).items():
    *parents, leaf = name.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def train_argv(workdir, cache_dir, overrides=None):
  """`python -m launch.train` argv equivalent to `smoke_config(cache_dir, overrides)`."""
  flags = {"data.cache_dir": str(cache_dir), **(overrides or {})}
  return [sys.executable, "-m", "launch.train", f"--config={SMOKE}", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in flags.items())]


def child_env(cache_dir=None, compile_cache=None, num_devices=None):
  """The environment of a child run: CPU only, a private corpus cache, optional fake devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if cache_dir is not None:
    env["MHC_JAX_CACHE"] = str(cache_dir)
  env.pop("XLA_FLAGS", None)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if compile_cache is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = str(compile_cache)
  if num_devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  return env


def run(argv, cache_dir=None, compile_cache=None, num_devices=None, timeout=CHILD_TIMEOUT_S):
  """A finished child process in the repository, output captured."""
  return subprocess.run(argv, cwd=REPO, env=child_env(cache_dir, compile_cache, num_devices),
                        capture_output=True, text=True, timeout=timeout, check=False)


def run_with_devices(target: str, num_devices: int, *args, timeout: int = 900):
  """Runs `module:function(*args)` in a child process with `num_devices` fake CPU devices and
  returns the JSON value of its last printed line (a fresh process: the device count is set
  before JAX starts)."""
  module, function = target.split(":")
  code = (f"import jax; jax.config.update('jax_num_cpu_devices', {num_devices}); "
          f"import {module} as m; m.{function}(*{args!r})")
  proc = run([sys.executable, "-c", code], timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


class Child:
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


def records(workdir):
  """metrics.jsonl without the wall-clock throughput, the one value allowed to differ."""
  return [{k: v for k, v in r.items() if k != "tokens_per_s"}
          for r in metrics.read_metrics(workdir)]


def checkpoint_steps(workdir):
  """Finalized checkpoint steps (Orbax writes `<step>.orbax-checkpoint-tmp...` first)."""
  ckpt_dir = Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def resumed_step(caplog):
  """The step of the one 'resumed from step K' log line."""
  steps = [int(m.group(1)) for m in (re.search(r"resumed from step (\d+)", r.getMessage())
                                     for r in caplog.records) if m]
  assert len(steps) == 1, f"expected one 'resumed from step' log line, got {steps}"
  return steps[0]
