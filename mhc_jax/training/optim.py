"""AdamW with warmup and a cosine or step schedule, global-norm clipping and a decay mask."""

from typing import Any

import jax
import optax

# Parameters spared from weight decay: norm scales, biases and the mHC/HC static coefficients.
NO_DECAY_NAMES = frozenset(
    {"scale", "norm", "bias", "alpha", "static_pre", "static_post", "static_res"})
SCHEDULES = ("cosine", "step")


def weight_decay_mask(params: Any) -> Any:
  """True for every leaf whose parameter name (its last dict key) is not in `NO_DECAY_NAMES`."""
  def decays(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return names[-1] not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


def make_schedule(opt_cfg: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine to `lr * min_lr_ratio`, or the paper's step decay
  (x0.316 at 80% and x0.1 at 90% of `total_steps`)."""
  warmup = min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
  if opt_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, opt_cfg.lr, warmup, max(total_steps, warmup + 1), opt_cfg.lr * opt_cfg.min_lr_ratio)
  if opt_cfg.schedule == "step":
    warm = optax.linear_schedule(0.0, opt_cfg.lr, warmup)
    const = optax.piecewise_constant_schedule(
        opt_cfg.lr, {int(0.8 * total_steps) - warmup: 0.316, int(0.9 * total_steps) - warmup: 0.1})
    return optax.join_schedules([warm, const], [warmup])
  raise ValueError(
      f"optimizer.schedule={opt_cfg.schedule!r} is invalid: choose one of {SCHEDULES}.")


def make_optimizer(opt_cfg: Any, total_steps: int) -> optax.GradientTransformation:
  """`clip_by_global_norm(grad_clip)` then AdamW with the schedule and the decay mask."""
  return optax.chain(
      optax.clip_by_global_norm(opt_cfg.grad_clip),
      optax.adamw(make_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2,
                  eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay, mask=weight_decay_mask),
  )
