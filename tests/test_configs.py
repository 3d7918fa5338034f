"""Every `configs/*.py` loads with every variant and gives valid run and model configs: the
training configs directly, the study config for each of its runs."""

import importlib
from pathlib import Path
import re

import pytest

from configs import loader
from mhc_jax.model.config import ModelConfig
from mhc_jax.study import plan as study
from mhc_jax.training import state as run_state

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
STUDY_CONFIG = CONFIGS_DIR / "study.py"
CONFIG_FILES = sorted(p for p in CONFIGS_DIR.glob("*.py")  # training configs
                      if p != STUDY_CONFIG and "def get_config(" in p.read_text())
VARIANTS = {
    "default.py": ("", "residual", "hc", "mhc", "n=2", "d=512", "smoke", "hc,smoke",
                   "mhc,n=2,smoke", "residual,smoke", "d=128,hc"),
    "paper.py": ("", "residual", "hc", "mhc", "smoke", "hc,smoke", "residual,smoke", "tiny",
                 "tiny,mhc_lite", "9b,hc", "27b,residual"),
}


def _load(path: Path):
  return importlib.import_module(f"configs.{path.stem}")


def test_there_are_configs():
  assert CONFIG_FILES, "no configs/*.py found"
  assert STUDY_CONFIG.is_file()


@pytest.mark.parametrize("variant", ["", "full", "quick", "smoke", "quick,smoke"])
def test_study_config_runs_are_valid_training_configs(variant, tmp_path):
  cfg = _load(STUDY_CONFIG).get_config(variant)
  runs = study.plan_runs(cfg, str(tmp_path))
  assert len(runs) == cfg.seeds * len(study.VARIANTS)
  widths = set()
  for run in runs:
    model = run_state.validate_config(run.config)
    assert model.connection == run.variant
    widths.add((model.d_model, model.num_layers, run.config.total_steps, run.config.batch_size,
                run.config.optimizer.lr))
  assert len(widths) == 1, f"variants differ in more than the connection: {widths}"


def test_study_config_documents_its_command_and_fields():
  module = _load(STUDY_CONFIG)
  assert "launch.study" in module.__doc__
  with pytest.raises(ValueError, match="'bogus'"):
    module.get_config("bogus")
  fields = [line for line in STUDY_CONFIG.read_text().splitlines()
            if re.match(r"^  c\.\w+ = ", line)]
  assert fields and all("#" in line for line in fields), fields


def test_every_config_has_variants():
  assert sorted(p.name for p in CONFIG_FILES) == sorted(VARIANTS)


@pytest.mark.parametrize("path,variant",
                         [(p, v) for p in CONFIG_FILES for v in VARIANTS.get(p.name, ())],
                         ids=lambda x: x.name if isinstance(x, Path) else (x or "base"))
def test_config_loads_and_validates(path, variant):
  config = _load(path).get_config(variant)
  model = ModelConfig.from_dict(config.model)
  assert run_state.validate_config(config) == model
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


@pytest.mark.parametrize("size,total,active", [("3b", 3e9, 612e6), ("9b", 9e9, 1.66e9),
                                               ("27b", 27e9, 4.14e9)])
def test_paper_configs_have_the_papers_parameter_counts(size, total, active):
  """Table 5's sizes: total parameters, and active ones (the embedding table not counted)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mhc_jax.model.decoder import DecoderLM  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig.from_dict(_load(CONFIGS_DIR / "paper.py").get_config(f"{size},mhc").model)
  params = jax.eval_shape(lambda: nn.meta.unbox(
      DecoderLM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))["params"]
  sizes = {jax.tree_util.keystr(p): x.size for p, x in jax.tree_util.tree_leaves_with_path(params)}
  routed = sum(v for k, v in sizes.items() if "experts_" in k)
  all_params = sum(sizes.values())
  active_params = (all_params - routed * (1 - cfg.experts_per_token / cfg.num_experts)
                   - cfg.vocab_size * cfg.d_model)
  assert all_params == pytest.approx(total, rel=0.02)
  assert active_params == pytest.approx(active, rel=0.01)


@pytest.mark.parametrize("arg,match", [("d=wide", "d='wide': expected a int"),
                                       ("size=3", "'size=3' is unknown"),
                                       ("mhc,,smoke", None)])
def test_parse_arg_types_and_names(arg, match):
  if match is None:
    assert loader.parse_arg(arg, presets=("mhc", "smoke")).presets == ("mhc", "smoke")
    return
  with pytest.raises(ValueError, match=re.escape(match)):
    loader.parse_arg(arg, presets=("mhc",), d=0)


def test_parse_arg_converts_to_the_default_type():
  a = loader.parse_arg("n=2,lr=0.5,flag=true,name=x", n=0, lr=1.0, flag=False, name="")
  assert (a.n, a.lr, a.flag, a.name, a.presets) == (2, 0.5, True, "x", ())


def test_load_config_by_path_and_by_name_agree():
  assert (loader.load_config("configs/default.py:hc,n=2").to_dict()
          == loader.load_config("default:hc,n=2").to_dict())
  with pytest.raises(ValueError, match="does not exist"):
    loader.load_config("configs/nope.py")
