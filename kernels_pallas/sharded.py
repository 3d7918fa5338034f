"""`shard_map` wrappers: the kernels on `(B, S, n, C)` activations sharded over batch/sequence.

Every kernel is per token, so each device runs it on its own tokens; phi, alpha and bias are
replicated (their gradients are summed across the token axes by `shard_map`'s transpose; `check_vma=False` because `pallas_call` outputs carry no varying-axes type). The
stream and feature axes are never sharded (spec §1).
"""

import functools

import jax
from jax.sharding import PartitionSpec as P

from kernels_pallas import api


def _specs(batch_axis, seq_axis):
  tok = (batch_axis, seq_axis)
  return dict(streams=P(*tok, None, None), token=P(*tok, None), coef=P(*tok, None),
              res=P(*tok, None, None), rep=P())


def mhc_coefficients(x_BxSxNxC, phi, alpha, bias, *, mesh, batch_axis="data", seq_axis=None,
                     **kwargs):
  """`api.mhc_coefficients` per shard; kwargs are its statics."""
  s = _specs(batch_axis, seq_axis)
  fn = jax.shard_map(
      functools.partial(api.mhc_coefficients, **kwargs), mesh=mesh, check_vma=False,
      in_specs=(s["streams"], s["rep"], s["rep"], s["rep"]),
      out_specs=(s["coef"], s["coef"], s["res"]))
  return fn(x_BxSxNxC, phi, alpha, bias)


def pre_mix(x_BxSxNxC, h_pre_BxSxN, *, mesh, batch_axis="data", seq_axis=None, block_sizes=None):
  s = _specs(batch_axis, seq_axis)
  fn = jax.shard_map(
      functools.partial(api.pre_mix, block_sizes=block_sizes), mesh=mesh, check_vma=False,
      in_specs=(s["streams"], s["coef"]), out_specs=s["token"])
  return fn(x_BxSxNxC, h_pre_BxSxN)


def post_res_mix(x_BxSxNxC, y_BxSxC, h_post_BxSxN, h_res_BxSxNxN, *, mesh, batch_axis="data",
                 seq_axis=None, block_sizes=None):
  s = _specs(batch_axis, seq_axis)
  fn = jax.shard_map(
      functools.partial(api.post_res_mix, block_sizes=block_sizes), mesh=mesh, check_vma=False,
      in_specs=(s["streams"], s["token"], s["coef"], s["res"]), out_specs=s["streams"])
  return fn(x_BxSxNxC, y_BxSxC, h_post_BxSxN, h_res_BxSxNxN)
