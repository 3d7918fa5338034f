"""`docs/api.md` lists names that exist, and every public name of the top-level and drop-in
modules is listed."""

import importlib
from pathlib import Path
import re
import types

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
HEADING = re.compile(r"^### `([\w.]+)`", re.M)


def documented() -> list[str]:
  return HEADING.findall(DOC.read_text())


def _resolve(name: str):
  """The object a dotted name denotes: the longest importable module prefix, then attributes."""
  parts = name.split(".")
  for cut in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:cut]))
    except ModuleNotFoundError:
      continue
    for attr in parts[cut:]:
      obj = getattr(obj, attr)
    return obj
  raise ImportError(name)


@pytest.mark.parametrize("name", documented())
def test_documented_name_exists(name):
  _resolve(name)


@pytest.mark.parametrize("module", ["mhc_jax", "mhc_jax.nnx", "mhc_jax.linen"])
def test_public_names_are_documented(module):
  mod = importlib.import_module(module)
  names = getattr(mod, "__all__", None) or [
      n for n, v in vars(mod).items()
      if not n.startswith("_") and not isinstance(v, types.ModuleType)]
  missing = sorted({f"{module}.{n}" for n in names} - set(documented()))
  assert not missing, f"docs/api.md does not list {missing}"


def test_the_parameter_count_example_holds():
  from mhc_jax.connection.spec import ConnectionSpec, num_params
  assert "num_params(ConnectionSpec(\"mhc\", n=4), 1280)   # 122,907" in DOC.read_text()
  assert num_params(ConnectionSpec("mhc", n=4), 1280) == 122_907
