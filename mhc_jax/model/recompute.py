"""The paper's block recompute (§4.3.2, math.md §8): groups of `L_r` blocks rebuilt in the backward.

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


StackFn = Callable[[int, str], nn.Module]  # (blocks, name) -> a scan of that many blocks


class _Groups(nn.Module):
  """The full groups (scanned, each rematerialised) and the shorter last group.

  `stack_fn(size, name)` builds the plain scan of `size` blocks (each under its remat policy)
  that one group runs (`stack.block_stack`).
  """
  stack_fn: StackFn
  length: int
  group: int

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
      x, out = groups(self.stack_fn, self.group, name="groups")(x, index_GxB, sin, cos)
      outs.append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), out))
    if rest:
      x, out = remat_group(self.stack_fn, rest, name="last")(
          x, block_index_L[num_full * self.group:], sin, cos)
      outs.append(out)
    return x, jax.tree.map(lambda *o: jnp.concatenate(o), *outs)


class _Group(nn.Module):
  """One group: `size` consecutive blocks as the plain scan, params `(size, ...)` under `blocks`."""
  stack_fn: StackFn
  size: int

  @nn.compact
  def __call__(self, x, block_index_G, sin, cos):
    return self.stack_fn(self.size, "blocks")(x, block_index_G, sin, cos)


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


def block_groups(stack_fn: StackFn, length: int, group: int, *, name: str | None) -> nn.Module:
  """`length` blocks in rematerialised groups of `group`, each group `stack_fn(group, ...)`.

  Called like the block scan it replaces, `(x, block_index_L, sin, cos) -> (x, per-block
  outputs stacked over L)`, and reads that scan's params. It only applies them: initialise with
  the plain scan under the same name, which keeps initial values independent of `group`.
  """
  def view(collections):
    if "params" not in collections:
      return collections
    return {**collections, "params": _split(collections["params"], length, group)}

  mapped = nn.map_variables(_Groups, "params", trans_in_fn=view)
  return mapped(stack_fn, length, group, name=name)
