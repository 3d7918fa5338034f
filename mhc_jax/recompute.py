"""The paper's block recompute (§4.3.2, docs/math.md §8): rebuild groups of `L_r` blocks in the backward pass.

A scan over rematerialised blocks keeps, for the backward pass, every block's input `x_l`
(n C per token) and what its remat policy saves. `block_groups` scans over groups of `group`
consecutive blocks instead, each group under one `nn.remat` that keeps only the group's input
and each sublayer's output (`sublayer_out`); everything else is rebuilt when the group's
gradient is taken. Inside a group every block keeps its own remat policy, so a group being
rebuilt holds its blocks' inputs and policy residuals, and one block's internals at a time.
The price: each group's forward runs twice, matmuls included. A stack whose length is not a
multiple of `group` ends with one shorter group; groups never span two stacks (dense, MoE).

The paper's accounting (streams only, per token, `L` blocks = 2L sublayers): kept
`n C ceil(L / group) + 2 C L`, plus `(n + 2) C * 2 group` for the group being rebuilt, least at
`group* = sqrt(n L / (2 (n + 2)))` blocks, the paper's `L_r* = sqrt(n L_sub / (n + 2))` in
sublayers halved. Here the group being rebuilt also holds the policy's residuals (the
projections), so the measured optimum can be smaller (benchmarks/README.md, "Block recompute").

Parameters keep the layout of a plain block scan, `(L, ...)` per leaf with the `layers` axis first,
and are initialised by that plain scan: checkpoints and initial values do not depend on the
group size. `nn.map_variables` presents them as `(L // group, group, ...)` to the scanned
groups and `(L % group, ...)` to the last one.
"""

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

_GROUP_AXIS = "layer_groups"  # Partition name of the scan over groups; removed from the layout.
_GROUP_SAVES = jax.checkpoint_policies.save_only_these_names("sublayer_out")


def optimal_group(n_streams: int, num_blocks: int) -> int:
  """`group*` in blocks, rounded to the nearest integer in [1, num_blocks]."""
  best = math.sqrt(n_streams * num_blocks / (2 * (n_streams + 2)))
  return max(1, min(num_blocks, round(best)))


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _map_leaves(fn: Callable[[jax.Array], jax.Array], tree: Any,
                names: Callable[[tuple], tuple] = lambda n: n) -> Any:
  """`fn` on every array of a param tree; partitioning boxes get their axis names from `names`."""
  def one(x):
    if isinstance(x, nn.LogicallyPartitioned):
      return x.replace(value=fn(x.value), names=names(tuple(x.names)))
    if _is_box(x):
      raise TypeError(f"block recompute cannot remap parameter metadata {type(x).__name__}.")
    return fn(x)
  return jax.tree.map(one, tree, is_leaf=_is_box)


class _Group(nn.Module):
  """`length` consecutive blocks as one `nn.scan`, each under `policy`; params `(length, ...)`."""
  block_cls: type
  block_args: tuple
  length: int
  policy: Any

  @nn.compact
  def __call__(self, x, block_index_G, sin, cos):
    block = nn.remat(self.block_cls, policy=self.policy, prevent_cse=False)
    stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(0, nn.broadcast, nn.broadcast), length=self.length,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    return stack(*self.block_args, name="blocks")(x, block_index_G, sin, cos)


class _Groups(nn.Module):
  """The full groups (scanned, each rematerialised) and the shorter last group.

  `policy` is the per-block remat policy inside a group.
  """
  block_cls: type
  block_args: tuple
  length: int
  group: int
  policy: Any

  @nn.compact
  def __call__(self, x, block_index_L, sin, cos):
    num_full, rest = divmod(self.length, self.group)
    remat_group = nn.remat(_Group, policy=_GROUP_SAVES, prevent_cse=False)
    outs = []
    if num_full:
      groups = nn.scan(remat_group, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(0, nn.broadcast, nn.broadcast), length=num_full,
                       metadata_params={nn.PARTITION_NAME: _GROUP_AXIS})
      index_GxB = block_index_L[:num_full * self.group].reshape(num_full, self.group)
      x, out = groups(self.block_cls, self.block_args, self.group, self.policy, name="groups")(
          x, index_GxB, sin, cos)
      outs.append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), out))
    if rest:
      x, out = remat_group(self.block_cls, self.block_args, rest, self.policy, name="last")(
          x, block_index_L[num_full * self.group:], sin, cos)
      outs.append(out)
    return x, jax.tree.map(lambda *o: jnp.concatenate(o), *outs)


def _split(params, length: int, group: int):
  """`(L, ...)` params -> `groups` `(L // group, group, ...)` and `last` `(L % group, ...)`."""
  num_full = length // group
  split = {}
  if num_full:
    split["groups"] = {"blocks": _map_leaves(
        lambda a: a[:num_full * group].reshape(num_full, group, *a.shape[1:]), params,
        lambda names: (_GROUP_AXIS, *names))}
  if length % group:
    split["last"] = {"blocks": _map_leaves(lambda a: a[num_full * group:], params)}
  return split


def block_groups(block_cls: type, block_args: tuple, length: int, group: int, policy: Any,
                 *, name: str) -> nn.Module:
  """`length` blocks in rematerialised groups of `group` (blocks inside under `policy`).

  Called like the block scan it replaces, `(x, block_index_L, sin, cos) -> (x, per-block
  outputs stacked over L)`, and reads that scan's params. It only applies them: initialise with
  the plain scan under the same name, which keeps initial values independent of `group`.
  """
  def view(collections):
    if "params" not in collections:
      return collections
    return {**collections, "params": _split(collections["params"], length, group)}

  mapped = nn.map_variables(_Groups, "params", trans_in_fn=view)
  return mapped(block_cls, block_args, length, group, policy, name=name)
