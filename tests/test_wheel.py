"""The package as a user installs it: `python -m build` makes a wheel and an sdist; the wheel
installs into a clean venv (its dependencies from the index), and there, outside the repository,
the README's "Use mHC in your own model" blocks and the two examples run as written."""

from pathlib import Path
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

import mhc_jax
from tests import helpers

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Use mHC in your own model"
pytestmark = pytest.mark.slow


def readme_blocks() -> list[str]:
  """The Python blocks of the README's drop-in section, in order."""
  text = (REPO / "README.md").read_text()
  assert SECTION in text, f"README.md has no section {SECTION!r}"
  section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
  out = tmp_path_factory.mktemp("dist")
  proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
                        capture_output=True, text=True, timeout=600, cwd=out)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return out


@pytest.fixture
def wheel_python(dist, tmp_path_factory):
  """The python of a fresh venv holding only the wheel and its dependencies."""
  venv = tmp_path_factory.mktemp("venv")
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  python = venv / "bin" / "python"
  wheel = next(dist.glob("*.whl"))
  proc = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)],
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return python


def _run_outside(python, argv, cwd, cache_dir, timeout=600):
  env = helpers.child_env(cache_dir)
  env.pop("PYTHONPATH", None)
  # Users copy these snippets: one that reaches a deprecated API fails.
  argv = ["-W", "error::DeprecationWarning", *argv]
  return subprocess.run([str(python), *argv], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_wheel_and_sdist_hold_the_package_once_versioned(dist):
  wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
  assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
  assert wheels[0].name == f"mhc_jax-{mhc_jax.__version__}-py3-none-any.whl"
  names = zipfile.ZipFile(wheels[0]).namelist()
  for module in ("mhc_jax/nnx.py", "mhc_jax/linen.py", "mhc_jax/connection/apply.py",
                 "kernels_pallas/coefficients.py", "mhc_jax/training/train.py"):
    assert module in names, module
  assert not [n for n in names if n.startswith(("tests/", "configs/", "launch/"))]
  metadata = zipfile.ZipFile(wheels[0]).read(
      f"mhc_jax-{mhc_jax.__version__}.dist-info/METADATA").decode()
  for extra in ("tpu", "cuda", "test"):
    assert f"Provides-Extra: {extra}" in metadata
  with tarfile.open(sdists[0]) as sdist:
    members = {Path(m).name for m in sdist.getnames()}
  assert {"pyproject.toml", "README.md", "nnx.py", "apply.py"} <= members


def test_readme_nnx_block_changes_fewer_than_15_lines():
  """The lines marked `mHC` are the whole change to the user's NNX model, and the README says how
  many there are."""
  marked = sum("# mHC" in line for line in readme_blocks()[0].splitlines())
  text = (REPO / "README.md").read_text()
  assert marked < 15 and f"The {marked} lines marked `mHC`" in text, marked


def test_readme_blocks_and_examples_run_from_the_wheel(wheel_python, tmp_path, cache_dir):
  """One test, so that one venv serves it under pytest-xdist."""
  where = _run_outside(wheel_python, ["-c", "import mhc_jax; print(mhc_jax.__file__)"], tmp_path,
                       cache_dir)
  assert str(wheel_python.parents[1]) in where.stdout, where.stdout + where.stderr
  blocks = readme_blocks()
  assert len(blocks) == 2
  for i, block in enumerate(blocks):
    script = tmp_path / f"block_{i}.py"
    script.write_text(block)
    proc = _run_outside(wheel_python, [str(script)], tmp_path, cache_dir)
    assert proc.returncode == 0, f"README block {i}:\n{block}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"README block {i} printed nothing"
  for example in ("nnx_gpt.py", "linen_gpt.py"):
    proc = _run_outside(wheel_python, [str(REPO / "examples" / example), "--steps=20",
                                       "--batch=8", "--seq=32"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)", proc.stdout)]
    assert len(losses) == 2 and losses[-1] < losses[0] < 6.0, proc.stdout  # ln 256 = 5.55
