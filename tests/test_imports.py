"""The import graph: no cycles (imports inside functions count), and the layer contracts of
pyproject.toml hold (`lint-imports`, which `make test` also runs first)."""

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mhc_jax", "kernels_pallas", "configs", "launch")


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.find_modules_directly_imported_by(v):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  sys.setrecursionlimit(10_000)
  for module in sorted(graph.modules):
    if module not in index:
      visit(module)
  return out


def test_no_import_cycles():
  graph = grimp.build_graph(*PACKAGES)
  # A package's __init__ re-exporting its modules is not a cycle of the code: drop those edges.
  for package in [m for m in graph.modules if graph.find_children(m)]:
    for imported in list(graph.find_modules_directly_imported_by(package)):
      graph.remove_import(importer=package, imported=imported)
  assert _cycles(graph) == []


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter is not installed (pip install -e '.[test]')")
def test_layer_contracts_hold():
  exe = Path(sys.executable).parent / "lint-imports"
  proc = subprocess.run([str(exe), "--no-cache"], cwd=REPO, capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:]


def test_the_public_api_of_the_flat_layout_still_works():
  import mhc_jax  # pylint: disable=g-import-not-at-top
  names = ("coefficients_from_logits", "mhc_coefficients", "num_logits", "amax_gain",
           "composite_backward", "composite_forward", "layer_diagnostics", "sinkhorn_knopp",
           "expand_streams", "post_res_mix", "pre_mix", "lite_coefficients",
           "permutation_mixture")
  assert [n for n in names if not callable(getattr(mhc_jax, n, None))] == []
