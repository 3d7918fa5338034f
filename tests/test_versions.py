"""Declared and locked versions: every core dependency is bounded above, the constraints pin
versions inside those bounds, figures can name their toolchain, and a deprecation reached from
our own code fails the suite."""

from pathlib import Path
import tomllib
import warnings

from packaging.requirements import Requirement
import pytest

from mhc_jax.parallel import platform

REPO = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  extras = [r for group in ("tpu", "cuda") for r in project["optional-dependencies"][group]]
  return [Requirement(r) for r in project["dependencies"] + extras]


def _pins(path: Path) -> dict[str, str]:
  lines = [l.split("#")[0].strip() for l in path.read_text().splitlines()]
  return {name.lower().replace("_", "-"): version
          for name, version in (l.split("==") for l in lines if l)}


@pytest.mark.parametrize("requirement", _requirements(), ids=str)
def test_every_core_dependency_is_bounded_above(requirement):
  assert any(spec.operator == "<" for spec in requirement.specifier), (
      f"pyproject.toml: {requirement} has no upper bound; bound it by the newest tested minor "
      "version")


@pytest.mark.parametrize("path", sorted((REPO / "constraints").glob("py*.txt")), ids=lambda p: p.name)
def test_constraints_pin_versions_inside_the_bounds(path):
  pins = _pins(path)
  assert "jax" in pins and "jaxlib" in pins, path
  for requirement in _requirements():
    name = requirement.name.lower()
    if name in pins:
      assert requirement.specifier.contains(pins[name], prereleases=True), (
          f"{path.name} pins {name}=={pins[name]}, outside pyproject's {requirement}")


def test_toolchain_versions_name_the_running_jax():
  import jax  # pylint: disable=g-import-not-at-top
  versions = platform.toolchain_versions()
  assert versions["jax"] == jax.__version__ and versions["python"].count(".") == 2


def test_a_deprecation_from_our_code_fails():
  with pytest.raises(DeprecationWarning):
    warnings.warn_explicit("old API", DeprecationWarning, "stack.py", 1,
                           module="mhc_jax.model.stack")
  with pytest.raises(DeprecationWarning):
    warnings.warn_explicit("old API", DeprecationWarning, "compile.py", 1, module="launch.compile")
  with pytest.warns(DeprecationWarning):  # another package's stays a warning
    warnings.warn_explicit("old API", DeprecationWarning, "x.py", 1, module="launchpad.x")
