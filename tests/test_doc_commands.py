"""Every `python -m launch.*` command that the README, the docs, the config docstrings and the
notebooks show runs as written (on the `smoke` variant) and writes what the README says.

The commands are read from those files, not copied here, so a doc edit is tested as it lands. Each
runs in a fresh directory holding a link to `configs/`, so relative paths (`runs/...`,
`data/mine`, `my_corpus/**/*.txt`) resolve as they do for a user in a clone.
"""

import json
import os
from pathlib import Path
import re
import shlex
import subprocess
import sys
import sysconfig

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "configs").glob("*.py")), *sorted((REPO / "notebooks").glob("*.ipynb"))]
COMMAND = re.compile(r"(?:\.venv/bin/)?python -m launch\.(\w+)((?:[^\n#`\\]|\\\n)*)")
SMOKE_CONFIG = {"train": "configs/default.py", "study": "configs/study.py",
                "compile": "configs/default.py"}
ORDER = ("prepare_data", "train", "study", "sample", "report", "compile")  # producers first
TPU_PYTHON = REPO / ".venv-tpu" / "bin" / "python"  # launch.compile runs there (make test)
CUDA_PYTHON = REPO / ".venv-cuda" / "bin" / "python"  # and there for --target=h100 (optional)
TIMEOUT_S = 300


def _text(path: Path) -> str:
  if path.suffix == ".ipynb":
    return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"])
  return path.read_text()


def doc_commands() -> list[tuple[str, list[str], str]]:
  """`(module, args, source file)` of every distinct command, producers first."""
  seen, found = set(), []
  for path in DOCS:
    for match in COMMAND.finditer(_text(path)):
      module, args = match.group(1), shlex.split(match.group(2).replace("\\\n", " "))
      key = (module, tuple(args))
      if key not in seen:
        seen.add(key)
        found.append((module, args, path.name))
  return sorted(found, key=lambda c: ORDER.index(c[0]) if c[0] in ORDER else len(ORDER))


def _smoke(module: str, args: list[str]) -> list[str]:
  """`args` with the config's `smoke` variant appended (train and study only); the pod launcher
  as a dry run (it would create Cloud TPUs)."""
  if module == "tpu_pod":
    return ["--dry_run", *args]
  if module not in SMOKE_CONFIG:
    return args
  if not any(a.startswith("--config=") for a in args):
    args = [f"--config={SMOKE_CONFIG[module]}", *args]
  return [(a + (",smoke" if ":" in a else ":smoke")) if a.startswith("--config=") else a
          for a in args]


def _flag(args: list[str], name: str) -> str | None:
  return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)


def _check_outputs(module: str, args: list[str], cwd: Path, stdout: str) -> None:
  """What the README promises each command leaves behind."""
  workdir = cwd / (_flag(args, "workdir") or "")
  if module == "train":
    for name in ("metrics.jsonl", "tensorboard", "checkpoints", "report.png", "config.json"):
      assert (workdir / name).exists(), f"{workdir} has no {name}"
  elif module == "study":
    for name in ("summary.json", "README.md", "study.png"):
      assert (workdir / name).exists(), f"{workdir} has no {name}"
  elif module == "prepare_data":
    assert (cwd / _flag(args, "output") / "meta.json").is_file()
  elif module == "report":
    assert Path(cwd / stdout.strip().splitlines()[-1]).is_file()
  elif module == "compile":
    assert "roofline step time" in stdout, stdout[-2000:]
  elif module == "tpu_pod":
    assert "gcloud compute tpus tpu-vm" in stdout, stdout[-2000:]
  elif module == "sample":
    assert stdout.startswith(_flag(args, "prompt") or "def "), stdout[:200]


def _corpus_dir(root: Path) -> None:
  """`my_corpus/`: a few hundred KB of text files (enough for a 4096-piece SentencePiece model)."""
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  for i, src in enumerate(sorted(stdlib.glob("*.py"))[:60]):
    target = root / "my_corpus" / f"part{i % 3}" / f"{src.stem}.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(src.read_text(errors="replace"))


def test_docs_show_every_entry_point_and_connection():
  commands = doc_commands()
  modules = {m for m, _, _ in commands}
  assert set(ORDER) <= modules, f"no documented command for {set(ORDER) - modules}"
  trained = " ".join(" ".join(a) for m, a, _ in commands if m == "train")
  for variant in ("residual", "hc", "mhc", "mhc_lite"):
    assert f":{variant}" in trained, f"no documented train command for {variant}"


@pytest.mark.slow
def test_every_documented_command_runs(tmp_path, cache_dir):
  (tmp_path / "configs").symlink_to(REPO / "configs")
  _corpus_dir(tmp_path)
  env = dict(os.environ, MHC_JAX_CACHE=str(cache_dir), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  for module, args, source in doc_commands():
    python = Path(sys.executable)
    if module == "compile":
      python = CUDA_PYTHON if _flag(args, "target") == "h100" else TPU_PYTHON
    if not python.exists():
      continue  # no .venv-tpu / .venv-cuda: tests/test_compile.py says so in its skips
    argv = [str(python), "-m", f"launch.{module}", *_smoke(module, args)]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    shown = f"{source}: {shlex.join(argv[1:])}"
    assert done.returncode == 0, f"{shown}\nexited {done.returncode}:\n{done.stderr[-3000:]}"
    _check_outputs(module, args, tmp_path, done.stdout)
