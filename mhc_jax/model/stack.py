"""A Transformer block and the one builder of block stacks.

`block_stack` builds every stack the model runs: a scan over blocks (`nn.scan`, the default), the
same scan unrolled into straight-line code (a pipeline chunk, where the compiler may overlap a
send with the chunk's compute), the paper's recompute groups (`recompute.py`), or a Python loop
of separately named blocks (`scan_layers=False`, for tests). All take
`(x, block_index_L, sin, cos)` and return `(x, per-block outputs stacked over L)`, and all keep
the block parameters in one layout: `(L, ...)` under `name` (the loop: `{name}_{i}`).

Remat by name (math.md §8): `mhc_block` is the paper's block recompute with `L_r` = one block. It
keeps each sublayer's projection outputs (dots without batch dims) and its output `y`
(`sublayer_out`) and rebuilds the n-stream tensors, norms and other elementwise values from the
block input. (A name-based "save all but the streams" policy does not work: the streams are also
residuals of the custom VJPs in `core/streams.py`, which carry no name.)
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mhc_jax import linen as mhc
from mhc_jax.model import recompute
from mhc_jax.model.config import ModelConfig
from mhc_jax.model.layers import Attention, RMSNorm, SwiGLU
from mhc_jax.model.mla import MLA
from mhc_jax.model.moe import MoE

STREAM_AXES = ("batch", "length", "streams", "embed")  # streams (B, S, n, C)
TOKEN_ROW_AXES = ("batch", "length", None)  # streams as token rows (B, S, n*C)
MODES = ("scan", "unrolled_scan", "loop")

_CP = jax.checkpoint_policies
REMAT_POLICIES = {
    "full": _CP.nothing_saveable,
    "dots": _CP.dots_with_no_batch_dims_saveable,
    "mhc_block": _CP.save_from_both_policies(_CP.dots_with_no_batch_dims_saveable,
                                             _CP.save_only_these_names("sublayer_out")),
}


class Block(nn.Module):
  """One Transformer block: two connection layers (attention, then SwiGLU or MoE).

  Under `impl="pallas"` the streams are token rows `(B, S, n*C)`, the layout the kernels read
  without a copy; under `"xla"` they are `(B, S, n, C)`. Returns `(streams, (coeffs, moe_stats))`;
  `coeffs` is None unless `return_coeffs`, `moe_stats` None unless `moe`.
  """
  cfg: ModelConfig
  impl: str = "xla"
  return_coeffs: bool = False
  moe: bool = False
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, streams, block_index, sin_SxR, cos_SxR):
    cfg, dt = self.cfg, self.cfg.activation_dtype
    attention = MLA if cfg.attention == "mla" else Attention
    stats = []
    # The sublayers are this block's children; the connection only calls them.
    attn, attn_norm = attention(cfg, self.mesh, name="attn"), RMSNorm(cfg.norm_eps, dt,
                                                                      name="attn_norm")
    mlp = MoE(cfg, self.mesh, name="moe") if self.moe else SwiGLU(cfg, name="mlp")
    mlp_norm = RMSNorm(cfg.norm_eps, dt, name="mlp_norm")

    def mlp_sublayer(u):
      if not self.moe:
        return mlp(mlp_norm(u))
      y, s = mlp(mlp_norm(u))
      stats.append(s)
      return y

    sublayers = (("attn", lambda u: attn(attn_norm(u), sin_SxR, cos_SxR)),
                 ("mlp", mlp_sublayer))
    # The streams are token rows under the kernels, except at init (which runs XLA).
    token_rows = self.impl == "pallas" and not self.is_initializing()
    all_coeffs = []
    for k, (name, sublayer) in enumerate(sublayers):
      streams = nn.with_logical_constraint(streams, TOKEN_ROW_AXES if token_rows else STREAM_AXES)
      streams, coeffs = mhc.Connection(
          **dataclasses.asdict(cfg.connection_spec), impl=self.impl, mesh=self.mesh,
          token_rows=token_rows, logical_axes=True, name=f"{name}_conn")(
              streams, sublayer, layer_index=2 * block_index + k, return_coeffs=True)
      all_coeffs.append(coeffs)
    stacked = jax.tree.map(lambda *c: jnp.stack(c), *all_coeffs) if self.return_coeffs else None
    return streams, (stacked, stats[0] if stats else None)


def _scan(cfg: ModelConfig, block_args: tuple, length: int, *, unroll: bool = False,
          name: str | None = None) -> nn.Module:
  """`length` blocks as one `nn.scan`, each under the config's remat policy; params `(L, ...)`."""
  block_cls = Block
  if cfg.remat_policy != "none":  # inside a scan, CSE cannot undo the remat: prevent_cse=False
    block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
  return nn.scan(
      block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
      in_axes=(0, nn.broadcast, nn.broadcast), length=length, unroll=length if unroll else 1,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )(*block_args, name=name)


def _loop(cfg: ModelConfig, block_args: tuple, length: int, name: str):
  """`length` separately named blocks `{name}_{i}` (call inside the parent's `nn.compact`)."""
  block_cls = Block
  if cfg.remat_policy != "none":  # outside a scan, keep JAX's CSE barrier (prevent_cse=True)
    block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy])

  def apply(streams, block_index_L, sin, cos):
    outs = []
    for i in range(length):
      streams, out = block_cls(*block_args, name=f"{name}_{i}")(
          streams, block_index_L[i], sin, cos)
      outs.append(out)
    return streams, jax.tree.map(lambda *o: jnp.stack(o), *outs)
  return apply


def block_stack(cfg: ModelConfig, *, length: int, name: str | None, impl: str = "xla",
                mesh: jax.sharding.Mesh | None = None, moe: bool = False,
                return_coeffs: bool = False, mode: str = "scan", initializing: bool = False):
  """The stack of `length` blocks, `(x, block_index_L, sin, cos) -> (x, outputs over L)`.

  mode: `scan` (with the paper's recompute groups when `cfg.recompute_blocks` asks for them),
  `unrolled_scan` (the scan as straight-line code), `loop` (blocks named `{name}_{i}`).
  Recompute groups only apply their params: `initializing` builds the plain scan, whose
  initial values do not depend on the group size. `name=None` builds a stack to `apply` on
  its own (a pipeline chunk: params are the `(L, ...)` block tree).
  """
  if mode not in MODES:
    raise ValueError(f"block_stack mode={mode!r}; choose one of {MODES}.")
  block_args = (cfg, impl, return_coeffs, moe, mesh)
  if mode == "loop":
    return _loop(cfg, block_args, length, name)
  group = min(length, cfg.recompute_blocks or recompute.optimal_group(cfg.n_streams, length))
  if mode == "scan" and group > 1 and not initializing:
    return recompute.block_groups(
        lambda size, name: _scan(cfg, block_args, size, name=name), length, group, name=name)
  return _scan(cfg, block_args, length, unroll=mode == "unrolled_scan", name=name)
