"""The training loop: sharded jitted steps, one-step-late metrics, eval, diagnostics, checkpoints.

`train_and_evaluate(config, workdir)` resumes from the latest checkpoint in `workdir` when there
is one and then continues the same trajectory as an uninterrupted run (bit-identical on CPU).
SIGTERM saves a checkpoint and returns; a non-finite loss raises `NonFiniteLossError` without
saving, so the last checkpoint on disk is the last good one.
"""

import json
import logging
import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mhc_jax.core.diagnostics import layer_diagnostics
from mhc_jax.parallel import sharding
from mhc_jax.training import checkpoint, data, optim, report
from mhc_jax.training.metrics import MetricsWriter, ProgressBar
from mhc_jax.training.state import build_state, check_pipeline, jit_train_step, validate_config
from mhc_jax.training.steps import eval_loss


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or Inf."""


def _diagnostics(state, tokens_BxS) -> dict[str, jax.Array]:
  """Per-layer Amax gains etc. of `H_res` and mean `H_pre`, `H_post` on a fixed batch."""
  _, coeffs = state.apply_fn({"params": state.params}, tokens_BxS, return_coeffs=True)
  diag = layer_diagnostics(coeffs.h_res)
  diag["h_pre_mean"] = jnp.mean(coeffs.h_pre, axis=(1, 2, 3))
  diag["h_post_mean"] = jnp.mean(coeffs.h_post, axis=(1, 2, 3))
  return diag


class _StopFlag:
  """Set by SIGTERM (preemption); the loop checkpoints and returns at the next step."""

  def __init__(self):
    self.requested = False

  def __call__(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.requested = True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`; returns the last logged scalars."""
  validate_config(config)
  is_main = jax.process_index() == 0
  logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  mesh = sharding.mesh_from_config(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
  summary = check_pipeline(config, mesh)
  if summary:
    logging.info(summary)
  data_dir = data.resolve_data_dir(config.data.dir or None, config.data.cache_dir or None)
  train_iter = data.make_train_iterator(data_dir, seq_len=config.seq_len,
                                        global_batch_size=config.batch_size, seed=config.seed)
  eval_ds = data.eval_dataset(data_dir, seq_len=config.seq_len,
                              global_batch_size=config.batch_size,
                              max_batches=config.eval_batches)
  batch_shard = sharding.batch_sharding(mesh)
  diag_tokens = sharding.global_batch(eval_ds[0], batch_shard)["inputs"]

  state, state_shard = build_state(config, mesh)
  mngr = checkpoint.make_manager(workdir, config.keep_checkpoints)
  writer = MetricsWriter(workdir, enabled=is_main)
  state, start = checkpoint.restore_latest(mngr, state, train_iter, config, workdir)
  if start:
    logging.info("resumed from step %d of %s", start, workdir)
  writer.truncate_after(start)  # drop lines logged after the checkpoint (or all, when fresh)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2)

  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    p_train = jit_train_step(state_shard, batch_shard, config.grad_accum_steps)
    p_eval = jax.jit(eval_loss, in_shardings=(state_shard, batch_shard))
    p_diag = jax.jit(_diagnostics, in_shardings=(state_shard, batch_shard))
  schedule = optim.make_schedule(config.optimizer, config.total_steps)
  tokens_per_step = config.batch_size * config.seq_len
  progress = ProgressBar(config.total_steps, start) if is_main else None
  stop = _StopFlag()
  old_handler = signal.signal(signal.SIGTERM, stop)
  last = {"time": time.perf_counter(), "step": start}
  scalars: dict[str, Any] = {}

  def finish(step, metrics, record):
    """Fetches a step's metrics (NaN check) and writes its record if it has one."""
    nonlocal scalars
    metrics = jax.device_get(metrics)
    if not math.isfinite(metrics["train_loss"]):
      raise NonFiniteLossError(
          f"train_loss is {metrics['train_loss']} at step {step}; stopped without saving. The "
          f"last good checkpoint (step {mngr.latest_step()}) is kept in {workdir}.")
    if record is not None:
      scalars = {**{k: float(v) for k, v in metrics.items()}, **record["scalars"]}
      writer.write(step, scalars, record.get("per_layer"))
      if progress:
        progress.update(step, scalars["train_loss"], scalars["tokens_per_s"])

  pending = None
  try:
    for step in range(start + 1, config.total_steps + 1):
      batch = sharding.global_batch(next(train_iter), batch_shard)
      with nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, metrics = p_train(state, batch)
      if pending is not None:
        finish(*pending)  # the previous step's metrics: one step late, the device never waits
        pending = None
      final = step == config.total_steps
      stopping = stop.requested  # Read once: a SIGTERM landing later in this step waits a step.
      do_eval = step % config.eval_every == 0 or final
      do_diag = step % config.diag_every == 0 or final
      do_ckpt = step % config.checkpoint_every == 0 or final or stopping
      record = None
      if step % config.log_every == 0 or do_eval or do_diag:
        now = time.perf_counter()
        rate = tokens_per_step * (step - last["step"]) / max(now - last["time"], 1e-9)
        last.update(time=now, step=step)
        record = {"scalars": {"lr": float(schedule(step - 1)), "tokens_per_s": rate}}
        if do_eval:
          losses = [p_eval(state, sharding.global_batch(b, batch_shard)) for b in eval_ds]
          record["scalars"]["eval_loss"] = float(np.mean(jax.device_get(losses)))
        if do_diag:
          diag = jax.device_get(p_diag(state, diag_tokens))
          record["per_layer"] = {f"diag/{k}": v.tolist() for k, v in diag.items()}
          record["scalars"]["diag/composite_fwd_max"] = float(np.max(diag["composite_fwd_avg"]))
          record["scalars"]["diag/composite_bwd_max"] = float(np.max(diag["composite_bwd_avg"]))
        last["time"] = time.perf_counter()  # tokens/s counts training time only
      if do_eval or do_diag or do_ckpt:
        finish(step, metrics, record)
      else:
        pending = (step, metrics, record)
      if do_ckpt:
        checkpoint.save(mngr, step, state, train_iter, config)
      if stopping:
        break
    if pending is not None:
      finish(*pending)
  finally:
    signal.signal(signal.SIGTERM, old_handler)
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    if progress:
      progress.close()
  if is_main and not stop.requested:
    logging.info("report: %s", report.write_report(workdir))
  return scalars
