"""Orbax checkpoints of the train state, the grain iterator and the run config, saved together.

Layout: `<workdir>/checkpoints/<step>/{state, data_iter, config}`. Saves are asynchronous and
the manager keeps the newest `keep` steps; a save only becomes visible once complete, so a crash
mid-save leaves the previous checkpoint intact.

Resume is elastic: a checkpoint saved on one mesh or process count restores on another. Orbax
reads the arrays into the new run's shardings, and the data position, which grain saves once per
process, is the global step in every process's file (`data.train_dataset`), so any of them
serves a run with another process count.
"""

import json
import logging
import os
import re
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from mhc_jax.model.config import ModelConfig
from mhc_jax.training import data
from mhc_jax.training import state as run_state  # (`state` names train states here)


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


def _warn_if_data_order_changes(saved: dict, config: ml_collections.ConfigDict, step: int) -> None:
  """The saved position is a step of the global batch order, which these fields define."""
  pairs = [(k, saved.get(k), config.get(k)) for k in ("batch_size", "seq_len", "seed")]
  pairs.append(("data.dir", saved.get("data", {}).get("dir"), config.data.get("dir")))
  changed = [f"{k}: checkpoint {a!r} vs now {b!r}" for k, a, b in pairs if a != b]
  if changed:
    logging.warning("resuming step %d with %s: the steps that follow read other examples than "
                    "the saved run would have.", step, ", ".join(changed))


def restore_data_position(step_dir: os.PathLike, data_iter: Any) -> None:
  """Sets `data_iter` to the position saved in `step_dir`, whatever process count saved it.

  grain writes `data_iter/process_<p>-of-<P>.json` per process. This process's own file is used
  when the process count is unchanged; otherwise the saved files must all hold one position,
  which holds for `data.train_dataset` (its position is the global step).
  """
  saved_dir = os.path.join(step_dir, "data_iter")
  names = sorted(f for f in os.listdir(saved_dir) if re.fullmatch(r"process_\d+-of-\d+\.json", f))
  own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  positions = {}
  for name in ([own] if own in names else names):
    with open(os.path.join(saved_dir, name)) as f:
      positions[name] = json.load(f)
  if len({json.dumps(v, sort_keys=True) for v in positions.values()}) != 1:
    raise ValueError(
        f"{saved_dir} holds no single data position to resume on {jax.process_count()} "
        f"process(es): {positions or 'no process_<p>-of-<P>.json file'}. Resume with the "
        "process count that saved it.")
  data_iter.set_state(next(iter(positions.values())))
  data_iter.start_prefetch()


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any) -> Any:
  """Returns the state restored into `abstract_state`'s shardings; `data_iter` is set in place."""
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state))).state
  restore_data_position(mngr.directory / str(step), data_iter)  # Orbax's default step names
  return state


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
    _warn_if_data_order_changes(saved, config, step)
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
  mngr = make_manager(workdir)
  step = mngr.latest_step()
  if step is None:
    raise ValueError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; "
                     "train first: python -m launch.train --workdir=" + workdir)
  config = run_state.upgrade_legacy_fields(ml_collections.ConfigDict(saved_config(mngr, step)))
  abstract = jax.eval_shape(lambda: run_state.build_state(config, mesh=None)[0])
  params = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract))).state.params
  data_dir = data.resolve_data_dir(config.data.get("dir") or None,
                                  config.data.get("cache_dir") or None)
  return ModelConfig.from_dict(config.model), params, str(data_dir)
