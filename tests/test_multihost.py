"""Two local processes through `jax.distributed.initialize` (--multihost) train like one."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from configs import default
from mhc_jax.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {d["step"]: d["train_loss"] for d in map(json.loads, f)}


def test_two_processes_match_one(tmp_path):
  cache = str(tmp_path / "cache")
  port = _free_port()
  cmd = [sys.executable, "-m", "launch.train", "--config=configs/default.py:smoke",
         f"--workdir={tmp_path / 'multi'}", f"--config.data.cache_dir={cache}", "--multihost",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  config = default.get_config("smoke")
  config.data.cache_dir = cache
  train.train_and_evaluate(config, str(tmp_path / "single"))  # the reference, meanwhile
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} failed:\n{log[-3000:]}"
    assert f"process {i}/2" in log
  multi, single = _losses(tmp_path / "multi"), _losses(tmp_path / "single")
  assert sorted(multi) == sorted(single)
  np.testing.assert_allclose([multi[s] for s in sorted(multi)],
                             [single[s] for s in sorted(single)], rtol=1e-5)
