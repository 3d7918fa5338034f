"""A run's config checked and turned into its train state and jitted step.

Shared by the training loop, checkpoint loading (`load_for_inference`), the compile-only builds
(`mhc_jax.aot`) and the study, so none of them imports the loop.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections

from mhc_jax.model.config import ModelConfig
from mhc_jax.model.decoder import DecoderLM
from mhc_jax.parallel import pipeline, sharding
from mhc_jax.parallel.pipeline import PipelineConfig
from mhc_jax.training import optim
from mhc_jax.training.steps import abstract_state, create_state, train_step

POSITIVE_FIELDS = ("total_steps", "batch_size", "grad_accum_steps", "seq_len", "eval_every",
                   "eval_batches", "checkpoint_every", "diag_every", "log_every",
                   "keep_checkpoints")
# Run fields renamed since a config.json or checkpoint may have been written: old -> new.
RENAMED_FIELDS = {"microbatches": "grad_accum_steps"}


def upgrade_legacy_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Renames, in place, the run fields of an older layout (`RENAMED_FIELDS`), with a warning."""
  for old, new in RENAMED_FIELDS.items():
    if old in config and new not in config:
      logging.warning("config.%s is the old name of config.%s (gradient accumulation); "
                      "reading it as config.%s=%r.", old, new, new, config[old])
      with config.unlocked():
        config[new] = config[old]
        del config[old]
  return config


def validate_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """Checks the run fields (after `upgrade_legacy_fields`); returns the validated `ModelConfig`."""
  upgrade_legacy_fields(config)
  for field in POSITIVE_FIELDS:
    value = config.get(field)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{field}={value!r} is invalid: must be a positive integer.")
  return ModelConfig.from_dict(config.model)


def check_pipeline(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> str | None:
  """Validates `config.pipeline` on `mesh`; returns a one-line summary when it pipelines."""
  cfg, stages = PipelineConfig.from_dict(config.get("pipeline")), mesh.shape["stage"]
  model = ModelConfig.from_dict(config.model)
  pipeline.check_pipeline(
      cfg, stages, num_layers=model.num_layers, moe_blocks=model.moe_blocks,
      scan_layers=model.scan_layers, batch_size=config.batch_size // config.grad_accum_steps,
      batch_ways=sharding.batch_parallelism(mesh))
  if stages == 1:
    return None
  return (f"pipeline: {stages} stages, {cfg.schedule} x{cfg.repeats}, {cfg.microbatches} "
          f"microbatches, sends {'overlapped' if cfg.overlap_sends else 'after compute'}, "
          f"bubble {pipeline.bubble_fraction(stages, cfg):.1%}")


def _model_optimizer_example(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None):
  model = DecoderLM(ModelConfig.from_dict(config.model), mesh,
                    PipelineConfig.from_dict(config.get("pipeline")))
  tx = optim.make_optimizer(config.optimizer, config.total_steps)
  return model, tx, jnp.zeros((1, config.seq_len), jnp.int32)


def build_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None):
  """`(state, state_sharding)` of a freshly initialised model and optimizer."""
  model, tx, example = _model_optimizer_example(config, mesh)
  return create_state(model, tx, jax.random.key(config.seed), example, mesh)


def build_abstract_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """`(state of sharded ShapeDtypeStructs, state_sharding)`, for compile-only builds."""
  return abstract_state(*_model_optimizer_example(config, mesh), mesh)


def jit_train_step(state_shard, batch_shard, grad_accum_steps: int = 1):
  """The jitted train step, sharded and donating its state (`launch.compile` builds this too)."""
  return jax.jit(functools.partial(train_step, grad_accum_steps=grad_accum_steps),
                 in_shardings=(state_shard, batch_shard), out_shardings=(state_shard, None),
                 donate_argnums=0)
