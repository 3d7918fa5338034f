"""The one place that reads a platform: which implementation runs on the devices of a step.

Every choice follows the devices the step is built for (a mesh's, or the host's default backend
without one), never the host alone, so a compile-only TPU build from a CPU host gets the TPU
kernels:

| choice | `tpu` | `gpu` | `cpu` |
|---|---|---|---|
| mHC (`model.mhc_impl='pallas'`) | Mosaic kernels | Triton kernels | kernels interpreted |
| attention `auto` | splash (seq % 128 == 0) | cuDNN (16-bit floats) | XLA |
| MoE grouped matmul `auto` | megablox (lane-dense dims) | `ragged_dot` | `ragged_dot` |

`kernel_shard_map` runs a per-device kernel (which XLA cannot partition) under a mesh.
`kernels_pallas`, a leaf that cannot ask this module, falls back to the host's backend when it is
called on its own without `BlockSizes.backend`; everything in `mhc_jax` passes the backend chosen
here.
"""

import dataclasses
from importlib import metadata
import logging
import sys

import jax
import jax.numpy as jnp

import kernels_pallas

MHC_IMPLS = ("xla", "pallas")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
MOE_IMPLS = ("auto", "ragged_dot", "megablox")
LANES = 128  # TPU lane width: splash and megablox tile by it


def toolchain_versions() -> dict[str, str]:
  """The versions a figure was measured with: Python, jax, jaxlib, flax and the compilers
  installed beside them (libtpu, JAX's CUDA plugin), the missing ones left out."""
  out = {"python": sys.version.split()[0]}
  for name in ("jax", "jaxlib", "flax", "libtpu", "jax-cuda13-plugin", "jax-cuda12-plugin"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def platform(mesh: jax.sharding.Mesh | None) -> str:
  """'tpu', 'gpu' or 'cpu': the devices of `mesh`, or the default backend without one."""
  name = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  return "gpu" if name in ("gpu", "cuda", "rocm") else name


def interpret(mesh: jax.sharding.Mesh | None) -> bool:
  """Whether Pallas kernels must run in interpret mode (CPU devices)."""
  return platform(mesh) == "cpu"


def kernel_block_sizes(mesh: jax.sharding.Mesh | None,
                       block_sizes: kernels_pallas.BlockSizes | None = None
                       ) -> kernels_pallas.BlockSizes:
  """`block_sizes` (or the backend's defaults) pinned to the kernel backend of `mesh`'s devices."""
  name = kernels_pallas.backend_for_platform(platform(mesh))
  if block_sizes is None:
    return kernels_pallas.BlockSizes.for_backend(name, backend=name)
  return block_sizes if block_sizes.backend else dataclasses.replace(block_sizes, backend=name)


def mhc_impl(requested: str, *, connection: str, n_streams: int, d_model: int,
             mesh: jax.sharding.Mesh | None = None) -> str:
  """'pallas' where the mHC kernels apply, else 'xla' (warning when 'pallas' was asked for)."""
  if requested not in MHC_IMPLS:
    raise ValueError(f"model.mhc_impl={requested!r} is unknown; choose one of {MHC_IMPLS}.")
  if requested != "pallas" or connection != "mhc" or n_streams == 1:
    return "xla"
  try:
    kernels_pallas.check_supported(n_streams, d_model, kernel_block_sizes(mesh))
  except ValueError as e:
    logging.warning("model.mhc_impl='pallas' unavailable (%s); using the XLA path.", e)
    return "xla"
  return "pallas"


def attention_impl(requested: str, *, seq_len: int, dtype=jnp.bfloat16,
                   mesh: jax.sharding.Mesh | None = None, on: str | None = None) -> str:
  """What `model.attention_impl=requested` means for sequences of `seq_len` in `dtype` (cuDNN's
  flash attention takes 16-bit floats only). `on` names a platform instead of a mesh's."""
  if requested not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention_impl={requested!r} is unknown; choose one of "
                     f"{ATTENTION_IMPLS}.")
  if requested != "auto":
    return requested
  where = on or platform(mesh)
  if where == "tpu" and seq_len % LANES == 0:
    return "splash"
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if where == "gpu" and half else "xla"


def moe_impl(requested: str = "auto", *, dims: tuple[int, ...] = (),
             mesh: jax.sharding.Mesh | None = None, on: str | None = None) -> str:
  """The grouped matmul `model.moe_impl=requested` means for matrices whose non-row dims are
  `dims`: megablox on TPU when they are lane-dense. `on` names a platform instead of a mesh's."""
  if requested not in MOE_IMPLS:
    raise ValueError(f"model.moe_impl={requested!r} is unknown; choose one of {MOE_IMPLS}.")
  if requested != "auto":
    return requested
  lane_dense = all(d % LANES == 0 for d in dims)
  return "megablox" if (on or platform(mesh)) == "tpu" and lane_dense else "ragged_dot"


def kernel_shard_map(fn, mesh: jax.sharding.Mesh, in_specs, out_specs):
  """`jax.shard_map` of a per-device kernel (Pallas calls cannot be partitioned by XLA) over the
  axes of `mesh` not already manual. Inside an enclosing `shard_map` (a pipeline stage, manual
  over `stage`) it nests: it maps the context mesh, whose `stage` axis is manual, over the rest.
  `check_vma=False`: a `pallas_call`'s outputs carry no varying-axes type."""
  context = jax.sharding.get_abstract_mesh()
  free = set(mesh.axis_names) - set(context.manual_axes)
  return jax.shard_map(fn, mesh=context if context.manual_axes else mesh, in_specs=in_specs,
                       out_specs=out_specs, axis_names=free, check_vma=False)
