"""The loss and the jit-able train and eval steps shared by training and benchmarks."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from mhc_jax.model import moe
from mhc_jax.model.decoder import apply_balance_update
from mhc_jax.parallel import sharding


class TrainState(train_state.TrainState):
  """Step, params, optimizer state (`apply_fn` and `tx` are static, not checkpointed)."""


def cross_entropy(logits_BxSxV: jax.Array, targets_BxS: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in nats per token."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BxSxV, targets_BxS))


def _init_boxed(model, tx, example_tokens_BxS):
  def init(rng):
    params = model.init(rng, example_tokens_BxS)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  return init


def state_sharding(model: nn.Module, tx: optax.GradientTransformation,
                   example_tokens_BxS: jax.Array, mesh: jax.sharding.Mesh) -> Any:
  """The train state's `NamedSharding`s on `mesh`, from the parameters' logical axis names."""
  boxed = jax.eval_shape(_init_boxed(model, tx, example_tokens_BxS), jax.random.key(0))
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, sharding.LOGICAL_RULES)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation,
                   example_tokens_BxS: jax.Array, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """`(state of ShapeDtypeStructs carrying their shardings, state_sharding)`: what a
  compile-only build lowers the train step with, without allocating anything."""
  shardings = state_sharding(model, tx, example_tokens_BxS, mesh)
  shapes = jax.eval_shape(lambda r: nn.meta.unbox(_init_boxed(model, tx, example_tokens_BxS)(r)),
                          jax.random.key(0))
  structs = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         shapes, shardings)
  return structs, shardings


def create_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                 example_tokens_BxS: jax.Array, mesh: jax.sharding.Mesh | None = None
                 ) -> tuple[TrainState, Any]:
  """Initialises params and optimizer state, laid out on `mesh` by their logical axis names.

  Returns `(state, state_sharding)`; without a mesh the state is wherever JAX puts it and the
  sharding is None.
  """
  init_boxed = _init_boxed(model, tx, example_tokens_BxS)
  if mesh is None:
    return nn.meta.unbox(init_boxed(rng)), None
  shardings = state_sharding(model, tx, example_tokens_BxS, mesh)
  init = jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=shardings)
  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return init(rng), shardings


def _loss_and_grads(params, apply_fn, batch):
  """`(cross-entropy, moe stats or None), grads` of one (micro)batch."""
  def loss_fn(params):
    logits, stats = apply_fn({"params": params}, batch["inputs"], return_moe_stats=True)
    ce = cross_entropy(logits, batch["targets"])
    aux = 0.0 if stats is None else jnp.sum(stats.balance_loss)
    return ce + aux, (ce, stats)

  (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return aux, grads


def _accumulate(params, apply_fn, batch, grad_accum_steps: int):
  """`_loss_and_grads` averaged over `grad_accum_steps` slices of the batch, one after another.

  Microbatch `i` holds rows `i, i + k, i + 2k, ...`: every device keeps its own rows, so the
  split moves no data. Expert loads add up; losses and gradients average.
  """
  def split(x):
    k = grad_accum_steps
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  def body(carry, micro):
    aux, grads = _loss_and_grads(params, apply_fn, micro)
    return jax.tree.map(jnp.add, carry, (aux, grads)), None

  first_aux, first_grads = jax.eval_shape(lambda p, b: _loss_and_grads(p, apply_fn, b), params,
                                          jax.tree.map(lambda x: split(x)[0], batch))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (first_aux, first_grads))
  (ce, stats), grads = jax.lax.scan(body, zeros, jax.tree.map(split, batch))[0]
  mean = lambda t: jax.tree.map(lambda x: x / grad_accum_steps, t)
  if stats is not None:
    stats = stats._replace(balance_rate=stats.balance_rate / grad_accum_steps,
                           balance_loss=stats.balance_loss / grad_accum_steps,
                           dropped=stats.dropped / grad_accum_steps)
  return (ce / grad_accum_steps, stats), mean(grads)


def train_step(state: TrainState, batch: dict[str, jax.Array], grad_accum_steps: int = 1
               ) -> tuple[TrainState, dict]:
  """One optimizer step on `batch = {inputs, targets}`; returns the new state and metrics.

  `grad_accum_steps > 1` accumulates gradients over that many slices of the batch (same update,
  less activation memory). A mixture-of-experts model adds its balance loss to the loss
  (`train_loss` stays the cross-entropy) and moves its balancing biases after the optimizer
  update, by the expert loads of the whole batch (`moe.py`).
  """
  if grad_accum_steps == 1:
    (ce, stats), grads = _loss_and_grads(state.params, state.apply_fn, batch)
  else:
    (ce, stats), grads = _accumulate(state.params, state.apply_fn, batch, grad_accum_steps)
  metrics = {"train_loss": ce, "grad_norm": optax.tree.norm(grads)}
  state = state.apply_gradients(grads=grads)
  if stats is not None:
    state = state.replace(params=apply_balance_update(state.params, stats))
    metrics.update(moe.load_metrics(stats))
  return state, metrics


def eval_loss(state: TrainState, batch: dict[str, jax.Array]) -> jax.Array:
  """Mean loss of `batch` under the current params."""
  logits = state.apply_fn({"params": state.params}, batch["inputs"])
  return cross_entropy(logits, batch["targets"])
