"""Device mesh and the logical-axis rules that map parameter/activation names onto it.

The mesh has axes `("data", "model")`: batch over `data`; MLP hidden, heads and vocabulary over
`model`. The streams axis of mHC is never sharded. Axes are `AxisType.Auto`, so the logical
constraints inside the model (`nn.with_logical_constraint`) act as sharding hints under `jit`.
"""

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")
LOGICAL_RULES = (
    ("batch", "data"),
    ("length", None),
    ("streams", None),
    ("embed", None),
    ("norm", None),
    ("layers", None),
    ("kv", None),
    ("heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
)


def make_mesh(data: int = -1, model: int = 1, devices=None) -> jax.sharding.Mesh:
  """A `(data, model)` mesh over `devices` (default: all); `-1` takes what the other axis leaves.

  `devices` may be compile-only devices of a TPU or GPU topology (see `mhc_jax.targets`).
  """
  devices = jax.devices() if devices is None else list(devices)
  num = len(devices)
  if model < 1 or num % model:
    raise ValueError(f"mesh.model={model} must be >= 1 and divide the {num} devices.")
  if data == -1:
    data = num // model
  if data * model != num:
    raise ValueError(
        f"mesh.data={data} x mesh.model={model} = {data * model} does not match the {num} "
        "devices; set mesh.data=-1 to use all of them.")
  return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batches `(B, S)` split over `data`."""
  return NamedSharding(mesh, PartitionSpec("data"))


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
  """Assembles every process's local rows into one global `jax.Array` per field."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
