"""Every notebook's code cells run top to bottom (so the walkthrough cannot rot)."""

import json
import pathlib

import pytest

NOTEBOOKS = sorted(pathlib.Path(__file__).parent.parent.joinpath("notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
  cells = json.loads(path.read_text())["cells"]
  code = [("".join(c["source"])) for c in cells if c["cell_type"] == "code"]
  assert code, f"{path} has no code cells"
  namespace = {}
  for source in code:
    exec(compile(source, str(path), "exec"), namespace)  # pylint: disable=exec-used
