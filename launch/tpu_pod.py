r"""Trains on a Cloud TPU slice from your machine: create or reuse it, install, train, fetch logs.

  python -m launch.tpu_pod --name=mhc-3b --zone=us-east5-a --project=my-project \
      --accelerator=v5p-32 --workdir=/mnt/runs/3b_mhc -- --config=configs/paper.py:3b,mhc

Everything after `--` goes to `launch.train` on every worker, which runs with `--multihost`: on
a TPU slice `jax.distributed.initialize()` finds the other workers by itself. `--dry_run` prints
every command and runs none. The steps (`--steps`, run in this order):

- create: reuse the slice `--name` if `describe` finds it, else create it;
- install: `git archive` of this checkout's HEAD (committed code only) is copied to every worker
  and installed, with libtpu, in its own `~/mhc-jax-<commit>` with a fresh `.venv`; nothing is
  deleted, so an earlier install and its runs stay as they were;
- train: starts `launch.train` in the background on every worker, logging to `~/mhc_train.log`;
- logs: copies each worker's log to `--logs_dir/worker_<i>.log`;
- delete: deletes the slice (only when named in `--steps`).

`--workdir` must be the same directory on every worker (a Filestore NFS share, or a bucket mounted
with gcsfuse): each worker writes its own shards of every checkpoint there.
"""

import dataclasses
import os
import shlex
import subprocess
import sys

from absl import app, flags

from mhc_jax.aot import targets

_NAME = flags.DEFINE_string("name", None, "TPU VM (slice) name.", required=True)
_ZONE = flags.DEFINE_string("zone", None, "Cloud zone, e.g. us-east5-a.", required=True)
_PROJECT = flags.DEFINE_string("project", None, "Cloud project (default: gcloud's own setting).")
_ACCELERATOR = flags.DEFINE_string("accelerator", "v5p-8", "v5p-N, v5e-N or v6e-N, as in "
                                   "launch.compile (v5p-N: N TensorCores).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory, shared by all workers.",
                               required=True)
_STEPS = flags.DEFINE_list("steps", ["create", "install", "train"],
                           "Any of create, install, train, logs, delete, in that order.")
_SPOT = flags.DEFINE_bool("spot", False, "Create the slice as Spot VMs.")
_LOGS_DIR = flags.DEFINE_string("logs_dir", "pod_logs", "Where `logs` puts the workers' logs.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print every command; run none.")

STEPS = ("create", "install", "train", "logs", "delete")
# Cloud TPU's names for the slices and the TPU software version to create them with (Cloud TPU
# docs, "TPU software versions": v2-alpha-tpuv5 for v5p, -tpuv5-lite for v5e, -tpuv6e for v6e).
_CLOUD = {"v5p": ("v5p-{n}", "v2-alpha-tpuv5"), "v5e": ("v5litepod-{n}", "v2-alpha-tpuv5-lite"),
          "v6e": ("v6e-{n}", "v2-alpha-tpuv6e")}
LOG = "~/mhc_train.log"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # what `install` archives


@dataclasses.dataclass(frozen=True)
class Pod:
  """One slice and where it lives."""
  name: str
  zone: str
  project: str | None
  accelerator: str  # ours, e.g. v5p-32

  @property
  def target(self) -> targets.Target:
    return targets.parse_target(self.accelerator)

  @property
  def cloud_type(self) -> str:
    family, _, n = self.accelerator.partition("-")
    return _CLOUD[family][0].format(n=n)

  @property
  def version(self) -> str:
    return _CLOUD[self.accelerator.partition("-")[0]][1]

  @property
  def workers(self) -> int:
    """TPU VM hosts: 4 chips each, but v5e and v6e slices of up to 8 chips are one host."""
    chips = self.target.chips
    single_host = self.target.chip_key in ("v5e", "v6e") and chips <= 8
    return 1 if single_host else max(chips // 4, 1)

  def gcloud(self, *args: str) -> list[str]:
    where = [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])
    return ["gcloud", "compute", "tpus", "tpu-vm", *args, *where]


def describe(pod: Pod) -> list[str]:
  return pod.gcloud("describe", pod.name)


def create(pod: Pod, spot: bool) -> list[str]:
  return pod.gcloud("create", pod.name, f"--accelerator-type={pod.cloud_type}",
                    f"--version={pod.version}", *(["--spot"] if spot else []))


def install(pod: Pod, commit: str) -> list[list[str]]:
  """Archive HEAD here, copy it to every worker, unpack and install it there."""
  archive = f"mhc-jax-{commit[:12]}.tar.gz"
  remote = f"~/mhc-jax-{commit[:12]}"
  setup = (f"set -e; mkdir -p {remote}; tar xzf ~/{archive} -C {remote}; cd {remote}; "
           "python3 -m venv .venv; .venv/bin/pip install -q --upgrade pip; "
           ".venv/bin/pip install -q -e '.[tpu]'")
  return [["git", "archive", "--format=tar.gz", f"--output=/tmp/{archive}", commit],
          pod.gcloud("scp", f"/tmp/{archive}", f"{pod.name}:~/", "--worker=all"),
          pod.gcloud("ssh", pod.name, "--worker=all", f"--command={setup}")]


def train(pod: Pod, commit: str, workdir: str, train_args: list[str]) -> list[str]:
  """Starts launch.train on every worker in the background (the ssh returns at once)."""
  args = shlex.join(["--multihost", f"--workdir={workdir}", *train_args])
  run = (f"cd ~/mhc-jax-{commit[:12]} && setsid nohup .venv/bin/python -m launch.train {args} "
         f"> {LOG} 2>&1 < /dev/null &")
  return pod.gcloud("ssh", pod.name, "--worker=all", f"--command={run}")


def logs(pod: Pod, logs_dir: str) -> list[list[str]]:
  return [pod.gcloud("scp", f"{pod.name}:{LOG}", os.path.join(logs_dir, f"worker_{i}.log"),
                     f"--worker={i}") for i in range(pod.workers)]


def delete(pod: Pod) -> list[str]:
  return pod.gcloud("delete", pod.name, "--quiet")


def check_flags(pod: Pod, workdir: str, steps: list[str]) -> None:
  """One-line errors for what would otherwise fail on the pod, minutes later."""
  if pod.accelerator.partition("-")[0] not in _CLOUD:
    raise ValueError(f"--accelerator={pod.accelerator!r} is not a Cloud TPU slice here; use v5p-N, "
                     "v5e-N or v6e-N (GPU clusters: launch/slurm_gpu.sbatch).")
  try:
    pod.target  # pylint: disable=pointless-statement
  except ValueError as e:
    raise ValueError(str(e).replace("--target=", "--accelerator=")) from None
  unknown = [s for s in steps if s not in STEPS]
  if unknown:
    raise ValueError(f"--steps: {unknown[0]!r} is not a step; use some of {list(STEPS)}.")
  if "://" in workdir or not workdir.startswith("/"):
    raise ValueError(f"--workdir={workdir!r} must be an absolute path that every worker sees "
                     "(an NFS share, or a bucket mounted with gcsfuse, e.g. /mnt/runs/3b_mhc).")


def _run(cmd: list[str], dry_run: bool, check: bool = True, cwd: str | None = None) -> int:
  print("$ " + shlex.join(cmd), flush=True)
  if dry_run:
    return 0
  return subprocess.run(cmd, check=check, cwd=cwd).returncode


def main(argv):
  train_args = argv[1:]
  steps = _STEPS.value
  try:
    pod = Pod(_NAME.value, _ZONE.value, _PROJECT.value, _ACCELERATOR.value)
    check_flags(pod, _WORKDIR.value, steps)
  except ValueError as e:
    sys.exit(f"error: {e}")
  dry = _DRY_RUN.value
  commit = "HEAD"
  if {"install", "train"} & set(steps):
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True, cwd=REPO).stdout.strip()
  print(f"# {pod.accelerator} (Cloud TPU type {pod.cloud_type}): {pod.target.chips} chips on "
        f"{pod.workers} worker(s); commit {commit[:12]}", flush=True)
  for step in (s for s in STEPS if s in steps):
    if step == "create":
      if _run(describe(pod), dry, check=False) != 0 or dry:
        print("# (create runs only when describe finds no slice of that name)", flush=True)
        _run(create(pod, _SPOT.value), dry)
    elif step == "install":
      for cmd in install(pod, commit):
        _run(cmd, dry, cwd=REPO)
    elif step == "train":
      _run(train(pod, commit, _WORKDIR.value, train_args), dry)
    elif step == "logs":
      if not dry:
        os.makedirs(_LOGS_DIR.value, exist_ok=True)
      for cmd in logs(pod, _LOGS_DIR.value):
        _run(cmd, dry)
    elif step == "delete":
      _run(delete(pod), dry)


if __name__ == "__main__":
  app.run(main)
