"""Every notebook executes top to bottom in a real Jupyter kernel, opens in Colab (its first code
cell installs the project when it is missing) and is committed with its outputs."""

import importlib.util
import pathlib
import subprocess

import nbformat
from nbclient import NotebookClient
import pytest

NOTEBOOKS = sorted(pathlib.Path(__file__).parent.parent.joinpath("notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 1200


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def _has_image(cell):
  return any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def test_there_are_notebooks():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "stability.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_colab_ready_and_committed_executed(path):
  nb = nbformat.read(path, as_version=4)
  first = _code_cells(nb)[0].source
  assert 'find_spec("mhc_jax")' in first and "pip" in first, first
  assert all(c.execution_count for c in _code_cells(nb)), f"{path.name} has unexecuted cells"
  assert any(_has_image(c) for c in _code_cells(nb)), f"{path.name} carries no plot"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_in_a_jupyter_kernel(path, tmp_path, cache_dir, monkeypatch):
  # The kernel inherits this environment: a private corpus cache and, for the stability
  # notebook, no finished study, so it runs the quick one into tmp_path.
  monkeypatch.setenv("MHC_JAX_CACHE", str(cache_dir))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MHC_STUDY_DIR", str(tmp_path / "no_study"))
  monkeypatch.setenv("MHC_QUICK_STUDY_DIR", str(tmp_path / "quick"))
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError, naming the cell, on any error
  errors = [o for c in _code_cells(nb) for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  assert any(_has_image(c) for c in _code_cells(nb))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_stops_with_one_sentence_when_nothing_is_set(path, monkeypatch):
  """Without mhc_jax and with MHC_JAX_SOURCE unset, the first cell installs nothing and says
  what to set."""
  first = _code_cells(nbformat.read(path, as_version=4))[0].source
  assert 'MHC_JAX_SOURCE = ""' in first and "github.com/mhc-jax" not in first
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
  with pytest.raises(RuntimeError, match=r"^mhc_jax is not installed: set MHC_JAX_SOURCE .*\.$"):
    exec(first, {})  # pylint: disable=exec-used
