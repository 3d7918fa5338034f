"""`shard_map` wrappers: the kernels on `(B, S, n, C)` (or `(B, S, n*C)`) activations sharded
over batch/sequence.

Mosaic and Triton kernels cannot be partitioned by XLA, so under a mesh each device runs them on
its own tokens (every kernel is per token). phi, alpha and bias are replicated; their gradients
are summed over the token axes by `shard_map`'s transpose. The stream and feature axes are never
sharded (spec §1); axes of the mesh that split neither (e.g. `model`) see replicated activations.
Inside a pipeline stage the `shard_map` nests in the pipeline's (`sharding.kernel_shard_map`).

The kernel backend follows the mesh's devices, not the host: a compile-only TPU mesh built on a
CPU host gets Mosaic, not the interpreter. `block_sizes=None` takes that backend's defaults.
"""

import dataclasses
import functools

import jax
from jax.sharding import PartitionSpec as P

from kernels_pallas import api, common
from mhc_jax.sharding import BATCH_AXES, kernel_shard_map


def _token_axes(mesh, batch_axis, seq_axis):
  if batch_axis is None:
    batch_axis = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
  return batch_axis, seq_axis


def for_mesh(mesh, block_sizes=None) -> common.BlockSizes:
  """`block_sizes` (or the defaults) with the backend of `mesh`'s devices."""
  name = common.backend_for_platform(mesh.devices.flat[0].platform)
  if block_sizes is None:
    return common.BlockSizes.for_backend(name, backend=name)
  return block_sizes if block_sizes.backend else dataclasses.replace(block_sizes, backend=name)


def _specs(mesh, batch_axis, seq_axis, x):
  """Specs by role; the streams `x` are `(B, S, n, C)` or token rows `(B, S, n*C)`."""
  tok = _token_axes(mesh, batch_axis, seq_axis)
  flat = x.ndim == 3
  return dict(streams=P(*tok, None) if flat else P(*tok, None, None), token=P(*tok, None),
              coef=P(*tok, None), res=P(*tok, None, None), rep=P())


def mhc_coefficients(x_BxSxNxC, phi, alpha, bias, *, mesh, batch_axis=None, seq_axis=None,
                     block_sizes=None, **kwargs):
  """`api.mhc_coefficients` per shard; kwargs are its statics. `batch_axis=None`: the mesh's
  batch axes among ("data", "fsdp", "expert")."""
  s = _specs(mesh, batch_axis, seq_axis, x_BxSxNxC)
  fn = kernel_shard_map(
      functools.partial(api.mhc_coefficients, block_sizes=for_mesh(mesh, block_sizes), **kwargs),
      mesh, (s["streams"], s["rep"], s["rep"], s["rep"]), (s["coef"], s["coef"], s["res"]))
  return fn(x_BxSxNxC, phi, alpha, bias)


def pre_mix(x_BxSxNxC, h_pre_BxSxN, *, mesh, batch_axis=None, seq_axis=None, block_sizes=None):
  s = _specs(mesh, batch_axis, seq_axis, x_BxSxNxC)
  fn = kernel_shard_map(
      functools.partial(api.pre_mix, block_sizes=for_mesh(mesh, block_sizes)), mesh,
      (s["streams"], s["coef"]), s["token"])
  return fn(x_BxSxNxC, h_pre_BxSxN)


def post_res_mix(x_BxSxNxC, y_BxSxC, h_post_BxSxN, h_res_BxSxNxN, *, mesh, batch_axis=None,
                 seq_axis=None, block_sizes=None):
  s = _specs(mesh, batch_axis, seq_axis, x_BxSxNxC)
  fn = kernel_shard_map(
      functools.partial(api.post_res_mix, block_sizes=for_mesh(mesh, block_sizes)), mesh,
      (s["streams"], s["token"], s["coef"], s["res"]), s["streams"])
  return fn(x_BxSxNxC, y_BxSxC, h_post_BxSxN, h_res_BxSxNxN)
