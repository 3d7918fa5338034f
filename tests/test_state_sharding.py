"""The train state's sharding builds on a mesh for every connection and exit (every parameter's
logical axis names are valid: no name twice in one array)."""

import jax
import pytest

from mhc_jax.parallel import sharding
from mhc_jax.training.state import build_state
from tests import helpers


@pytest.mark.parametrize("model", [
    dict(connection="residual", n_streams=1), dict(connection="hc"), dict(connection="mhc"),
    dict(connection="mhc", mhc_dynamic=False), dict(connection="mhc", mhc_exit="sum"),
    dict(connection="mhc", mhc_exit="mean"), dict(connection="mhc_lite"),
    dict(connection="mhc_lite", mhc_dynamic=False)], ids=str)
def test_train_state_sharding_builds(tmp_path, model):
  config = helpers.smoke_config(tmp_path, {f"model.{k}": v for k, v in model.items()})
  state, state_sharding = build_state(config, sharding.make_mesh())
  for leaf, leaf_sharding in zip(jax.tree.leaves(state), jax.tree.leaves(state_sharding)):
    assert leaf.sharding.is_equivalent_to(leaf_sharding, leaf.ndim)
