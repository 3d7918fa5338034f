"""The loss and the jit-able train and eval steps shared by training and benchmarks."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from mhc_jax import sharding


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


def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
  """One optimizer step on `batch = {inputs, targets}`; returns the new state and metrics."""
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, batch["inputs"])
    return cross_entropy(logits, batch["targets"])

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  metrics = {"train_loss": loss, "grad_norm": optax.tree.norm(grads)}
  return state.apply_gradients(grads=grads), metrics


def eval_loss(state: TrainState, batch: dict[str, jax.Array]) -> jax.Array:
  """Mean loss of `batch` under the current params."""
  logits = state.apply_fn({"params": state.params}, batch["inputs"])
  return cross_entropy(logits, batch["targets"])
