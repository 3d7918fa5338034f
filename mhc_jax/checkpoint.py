"""Orbax checkpoints of the train state, the grain iterator and the run config, saved together.

Layout: `<workdir>/checkpoints/<step>/{state, data_iter, config}`. Saves are asynchronous and
the manager keeps the newest `keep` steps; a save only becomes visible once complete, so a crash
mid-save leaves the previous checkpoint intact.
"""

import logging
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from mhc_jax import data
from mhc_jax.config import ModelConfig


def make_manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
  )


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any,
         config: ml_collections.ConfigDict) -> None:
  if step in mngr.all_steps():  # only a damaged checkpoint that the run fell back past
    logging.warning("replacing the damaged checkpoint of step %d.", step)
    mngr.delete(step)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data_iter=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(config.to_dict()),
  ))


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def check_compatible(saved: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a checkpoint of a different model, naming the fields that differ."""
  current = ModelConfig.from_dict(config.model).__dict__
  before = ModelConfig.from_dict(saved["model"]).__dict__
  diff = {k: (before[k], current[k]) for k in current if before[k] != current[k]}
  if diff:
    shown = ", ".join(f"model.{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
    raise ValueError(
        f"{workdir} holds a checkpoint of a different model ({shown}). Use another --workdir, "
        "or the checkpoint's settings, to resume.")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any) -> Any:
  """Returns the restored state; `data_iter` is restored in place."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data_iter=grain.checkpoint.CheckpointRestore(data_iter),
  ))
  return restored.state


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any, data_iter: Any,
                   config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, int]:
  """`(state, step)` of the newest checkpoint that restores, or `(abstract_state, 0)` if none.

  A checkpoint that fails to restore (damaged files) is logged and skipped for the one before it;
  nothing is deleted, and the damaged step stays on disk until the run saves that step again. A
  checkpoint of another model stops the run (`check_compatible`).
  """
  failures = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      saved = saved_config(mngr, step)
    except Exception as e:  # pylint: disable=broad-except  (any damage: try the previous one)
      failures.append((step, e))
      continue
    check_compatible(saved, config, workdir)
    try:
      return restore(mngr, step, abstract_state, data_iter), step
    except Exception as e:  # pylint: disable=broad-except
      failures.append((step, e))
      logging.warning("checkpoint step %d of %s failed to restore (%s: %s); trying the one "
                      "before it. It stays on disk until step %d is saved again.", step, workdir,
                      type(e).__name__, str(e)[:300], step)
  if failures:
    shown = "; ".join(f"step {s}: {type(e).__name__}: {str(e)[:200]}" for s, e in failures)
    raise ValueError(
        f"no checkpoint in {os.path.join(workdir, 'checkpoints')} restores ({shown}). Move that "
        "directory away to train from scratch, or restore it from a copy.")
  return abstract_state, 0


def load_for_inference(workdir: str) -> tuple[ModelConfig, Any, str]:
  """`(model_config, params, data_dir)` of the latest checkpoint in `workdir`.

  `data_dir` is the run's corpus, resolved: the stdlib corpus in the run's cache when it trained
  on the default (`data.dir == ""`), so callers can always `corpus.read_meta` it.
  """
  from mhc_jax import train  # pylint: disable=g-import-not-at-top  (train imports this module)
  mngr = make_manager(workdir)
  step = mngr.latest_step()
  if step is None:
    raise ValueError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; "
                     "train first: python -m launch.train --workdir=" + workdir)
  config = ml_collections.ConfigDict(saved_config(mngr, step))
  abstract = jax.eval_shape(lambda: train.build_state(config, mesh=None)[0])
  params = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract))).state.params
  data_dir = data.resolve_data_dir(config.data.get("dir") or None,
                                  config.data.get("cache_dir") or None)
  return ModelConfig.from_dict(config.model), params, str(data_dir)
