"""Launchers: the TPU slice commands (dry run, and a stand-in gcloud) and the SLURM script."""

import os
import socket
import stat
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = [sys.executable, "-m", "launch.tpu_pod", "--name=mhc-3b", "--zone=us-east5-a",
       "--project=proj", "--workdir=/mnt/runs/3b"]


def _fake(bin_dir, name: str, body: str) -> None:
  path = bin_dir / name
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _pod(*args, env=None):
  return subprocess.run([*POD, *args], cwd=REPO, capture_output=True, text=True, check=False,
                        env=env)


def _commands(stdout: str) -> list[str]:
  return [line[2:] for line in stdout.splitlines() if line.startswith("$ ")]


def test_pod_dry_run_prints_every_step_and_runs_nothing(tmp_path):
  # A gcloud that would leave a trace if anything ran it.
  _fake(tmp_path, "gcloud", f"touch {tmp_path}/ran\n")
  env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
  proc = _pod("--accelerator=v5p-32", "--steps=create,install,train,logs", "--dry_run", "--",
              "--config=configs/paper.py:3b,mhc", env=env)
  assert proc.returncode == 0, proc.stderr
  assert not (tmp_path / "ran").exists()
  cmds = _commands(proc.stdout)
  commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
  assert cmds[0].startswith("gcloud compute tpus tpu-vm describe mhc-3b --zone=us-east5-a")
  assert ("create mhc-3b --accelerator-type=v5p-32 --version=v2-alpha-tpuv5 --zone=us-east5-a "
          "--project=proj") in cmds[1]
  archive = f"/tmp/mhc-jax-{commit[:12]}.tar.gz"
  assert cmds[2] == f"git archive --format=tar.gz --output={archive} {commit}"
  assert "scp" in cmds[3] and "--worker=all" in cmds[3]
  assert "--worker=all" in cmds[4] and "pip install -q -e" in cmds[4]
  train = cmds[5]
  assert "--worker=all" in train and f"cd ~/mhc-jax-{commit[:12]}" in train
  assert ("launch.train --multihost --workdir=/mnt/runs/3b --config=configs/paper.py:3b,mhc"
          in train)
  # v5p-32 is 16 chips on 4 hosts: one log per worker.
  assert [c.split("--worker=")[1].split()[0] for c in cmds[6:]] == ["0", "1", "2", "3"]


def test_pod_reuses_an_existing_slice_and_creates_a_missing_one(tmp_path):
  calls = tmp_path / "calls"
  for exists, expected in ((True, ["describe"]), (False, ["describe", "create"])):
    calls.write_text("")
    status = 0 if exists else 1
    _fake(tmp_path, "gcloud",
          f'echo "$4" >> {calls}\nif [ "$4" = describe ]; then exit {status}; fi\nexit 0\n')
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    proc = _pod("--accelerator=v5e-16", "--steps=create", env=env)
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().split() == expected
  assert "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite" in proc.stdout


def test_pod_bad_flags_fail_at_once_with_the_fix():
  for args, words in ((["--accelerator=v4-8"], "v5p-N, v5e-N or v6e-N"),
                      (["--accelerator=v5p-7"], "--accelerator='v5p-7' is unknown"),
                      (["--workdir=gs://bucket/run"], "gcsfuse"),
                      (["--steps=create,train,launch"], "'launch' is not a step")):
    proc = _pod(*args, "--dry_run")
    assert proc.returncode != 0 and words in proc.stderr, (args, proc.stderr)


def test_slurm_script_processes_find_each_other(tmp_path):
  """launch/slurm_gpu.sbatch under a fake `srun` that starts its two tasks here, with the
  variables SLURM gives them: `jax.distributed.initialize()` must find the peer by itself."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  # jax's SLURM support puts the coordinator on the first node at 61440 + job id % 4096.
  job_id = port - 61440 if port >= 61440 else None
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake(bin_dir, "srun", (
      'while [[ "$1" == --* ]]; do shift; done\n'
      "for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=$i \"$@\" > "
      f"{tmp_path}/task_$i.log 2>&1 & done\n"
      "rc=0; for p in $(jobs -p); do wait $p || rc=1; done; exit $rc\n"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "PYTHON": sys.executable, "SLURM_SUBMIT_DIR": REPO, "SLURM_NTASKS": "2",
         "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": str(job_id or 4000)}
  proc = subprocess.run(
      ["bash", os.path.join(REPO, "launch/slurm_gpu.sbatch"), "--config=configs/default.py:smoke",
       f"--workdir={tmp_path / 'run'}", f"--config.data.cache_dir={tmp_path / 'cache'}",
       "--config.total_steps=2"], cwd=tmp_path, env=env, capture_output=True, text=True,
      timeout=600, check=False)
  logs = [(tmp_path / f"task_{i}.log").read_text() for i in range(2)
          if (tmp_path / f"task_{i}.log").exists()]
  assert proc.returncode == 0, "\n".join([proc.stderr, *(log[-2000:] for log in logs)])
  for i, log in enumerate(logs):
    assert f"process {i}/2" in log, log[-2000:]
  assert (tmp_path / "run" / "metrics.jsonl").exists()
