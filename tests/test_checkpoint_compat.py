"""A checkpoint written before the package was split into layers (fixtures/checkpoint_v0_1: a
2-step run of a 2-block, 2-stream, d_model-16 mHC model whose config.json still says
`microbatches` for gradient accumulation) restores in today's layout."""

import logging
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.model.decoder import DecoderLM
from mhc_jax.training import checkpoint, train
from tests import helpers

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint_v0_1"
FIXTURE_MODEL = {"model.d_model": 16, "model.num_heads": 2, "model.num_layers": 2,
                 "model.n_streams": 2}


def test_old_checkpoint_gives_the_logits_it_gave_when_saved(caplog):
  with caplog.at_level(logging.WARNING):
    cfg, params, _ = checkpoint.load_for_inference(str(FIXTURE))
  assert "config.microbatches is the old name of config.grad_accum_steps" in caplog.text
  tokens = (jnp.arange(2 * 16).reshape(2, 16) * 7) % 256  # what the fixture's logits were of
  logits = DecoderLM(cfg).apply({"params": params}, tokens)
  np.testing.assert_array_equal(np.asarray(logits), np.load(FIXTURE / "logits.npy"))


@pytest.mark.usefixtures("compile_cache")
def test_training_resumes_from_an_old_checkpoint(tmp_path, cache_dir, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(FIXTURE, workdir)
  config = helpers.smoke_config(cache_dir, {**FIXTURE_MODEL, "total_steps": 4,
                                            "checkpoint_every": 2, "grad_accum_steps": 2})
  with caplog.at_level(logging.INFO):
    scalars = train.train_and_evaluate(config, str(workdir))
  assert helpers.resumed_step(caplog) == 2
  assert np.isfinite(scalars["train_loss"])
  assert helpers.checkpoint_steps(workdir)[-1] == 4
