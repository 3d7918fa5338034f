"""Every `configs/*.py` loads with every variant and gives a valid run and model config."""

import importlib.util
from pathlib import Path
import re

import pytest

from mhc_jax import train
from mhc_jax.config import ModelConfig

CONFIG_FILES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))
VARIANTS = ("", "residual", "hc", "mhc", "n=2", "d=512", "smoke", "hc,smoke", "mhc,n=2,smoke",
            "residual,smoke", "d=128,hc")


def _load(path: Path):
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_configs():
  assert CONFIG_FILES, "no configs/*.py found"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v or "base")
def test_config_loads_and_validates(path, variant):
  config = _load(path).get_config(variant)
  model = ModelConfig.from_dict(config.model)
  assert train.validate_config(config) == model
  parts = set(variant.split(","))
  if "residual" in parts:
    assert (model.connection, model.n_streams) == ("residual", 1)
  if "hc" in parts:
    assert model.connection == "hc" and model.n_streams >= 2
  if "mhc" in parts:
    assert model.connection == "mhc" and model.n_streams >= 2
  if "n=2" in parts:
    assert model.n_streams == 2
  for part in parts:
    if part.startswith("d="):
      assert model.d_model == int(part[2:])
      assert model.head_dim == 64
  if "smoke" in parts:
    base = _load(path).get_config("")
    assert config.total_steps < base.total_steps and config.seq_len < base.seq_len
    assert model.d_model < base.model.d_model


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_none_is_the_base_config(path):
  module = _load(path)
  assert module.get_config(None).to_dict() == module.get_config("").to_dict()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("arg", ["bogus", "hc,bogus", "smoke,n2"])
def test_unknown_variant_is_named(path, arg):
  bad = arg.split(",")[-1]
  with pytest.raises(ValueError, match=re.escape(repr(bad))):
    _load(path).get_config(arg)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_documents_its_command_and_fields(path):
  """The docstring gives the command; every `c.<field> = <value>` line has a comment."""
  module = _load(path)
  assert "launch.train" in module.__doc__ or "make train" in module.__doc__
  assignments = [line for line in path.read_text().splitlines()
                 if re.match(r"^  c\.[\w.]+ = ", line) and "ConfigDict()" not in line]
  assert assignments
  undocumented = [line for line in assignments if "#" not in line]
  assert not undocumented, f"config fields without a comment: {undocumented}"
