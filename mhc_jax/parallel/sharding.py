"""Device mesh and the logical-axis rules that map parameter/activation names onto it.

The mesh has axes `("stage", "data", "fsdp", "expert", "model")`:
- the blocks are split over `stage` (pipeline parallelism, `pipeline.py`): the layer axis of
  the stacked block parameters is sharded over it;
- the batch is split over `data`, `fsdp` and `expert`;
- `fsdp` also shards every parameter's model dimension C (logical `embed`), and with it the
  optimizer state (ZeRO-3 / FSDP): XLA gathers each weight where it is used and reduce-scatters
  its gradient. `data` replicates the parameters;
- routed experts over `expert` (expert parallelism, `moe.py`), each expert's weights over `data`,
  `fsdp` and `model`;
- MLP hidden, heads and vocabulary over `model` (tensor parallelism).
The streams axis of mHC is never sharded. A logical name whose mesh axis is already taken in the
same array (an activation's `embed` once `batch` holds `fsdp`) stays unsharded. Axes are
`AxisType.Auto`, so the logical constraints inside the model (`nn.with_logical_constraint`) act
as sharding hints under `jit`.
"""

import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("stage", "data", "fsdp", "expert", "model")
BATCH_AXES = ("data", "fsdp", "expert")  # the batch is split over these
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("exp", "expert"),
    ("exp_embed", ("data", "fsdp", "model")),  # each expert's C, split ZeRO-3 style (moe.py)
    ("length", None),
    ("streams", None),
    ("embed", "fsdp"),
    ("stream_embed", "fsdp"),  # the n*C rows of mHC's projection phi (a parameter)
    ("norm", None),
    ("layers", "stage"),
    ("kv", None),
    ("heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
)


def make_mesh(data: int = -1, model: int = 1, devices=None, *, expert: int = 1, fsdp: int = 1,
              stage: int = 1) -> jax.sharding.Mesh:
  """A `(stage, data, fsdp, expert, model)` mesh over `devices` (default: all); `data=-1` takes
  what the other axes leave.

  `devices` may be compile-only devices of a TPU or GPU topology (see `mhc_jax.targets`).
  """
  devices = jax.devices() if devices is None else list(devices)
  num = len(devices)
  for name, size in (("model", model), ("expert", expert), ("fsdp", fsdp), ("stage", stage)):
    if size < 1 or num % size:
      raise ValueError(f"mesh.{name}={size} must be >= 1 and divide the {num} devices.")
  others = stage * fsdp * expert * model
  if num % others:
    raise ValueError(f"mesh.stage={stage} x mesh.fsdp={fsdp} x mesh.expert={expert} x "
                     f"mesh.model={model} must divide the {num} devices.")
  if data == -1:
    data = num // others
  if data * others != num:
    raise ValueError(
        f"mesh.stage={stage} x mesh.data={data} x mesh.fsdp={fsdp} x mesh.expert={expert} x "
        f"mesh.model={model} = {data * others} does not match the {num} devices; set "
        "mesh.data=-1 to use all of them.")
  shape, axis_types = (stage, data, fsdp, expert, model), (AxisType.Auto,) * 5
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  except NotImplementedError:
    # An axis that is no product of whole torus axes (8 on a 4x4x4 v5p slice): let it split one.
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def mesh_from_config(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """`make_mesh` from a config's `mesh` fields (`expert`, `fsdp`, `stage` optional, default 1)."""
  return make_mesh(mesh_cfg.data, mesh_cfg.model, devices, expert=mesh_cfg.get("expert", 1),
                   fsdp=mesh_cfg.get("fsdp", 1), stage=mesh_cfg.get("stage", 1))


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  """The batch axes (`BATCH_AXES`) that `mesh` has."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_parallelism(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch is split: `data x fsdp x expert`."""
  return mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, grad_accum_steps: int = 1) -> None:
  """Every microbatch must split evenly over the batch-parallel devices (`data x fsdp x expert`)."""
  ways = batch_parallelism(mesh)
  if batch_size % (ways * grad_accum_steps):
    raise ValueError(
        f"config.batch_size={batch_size} must be divisible by grad_accum_steps="
        f"{grad_accum_steps} x the {ways} batch-parallel devices (mesh.data={mesh.shape['data']} x "
        f"mesh.fsdp={mesh.shape['fsdp']} x mesh.expert={mesh.shape['expert']}); change "
        "batch_size, grad_accum_steps or the mesh.")


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batches `(B, S)` split over the batch axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
  """Assembles every process's local rows into one global `jax.Array` per field."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
