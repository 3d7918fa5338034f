"""Decoder-only language model whose sublayers are wrapped by a residual, HC or mHC connection.

tokens -> embed -> expand to n streams -> nn.scan over blocks (attention, MLP; each a connection
layer) -> exit collapse -> final RMSNorm -> untied LM head. With `return_coeffs=True` the per-layer
coefficients come out of the scan as outputs of shape `(2 * num_layers, B, S, ...)`.

Attention is grouped-query (`Attention`) or latent (`MLA`). With `num_experts > 0` the first
`dense_blocks` blocks keep the dense MLP (scan `blocks`) and the rest use a mixture of experts
(scan `moe_blocks`); `return_moe_stats=True` returns their routing statistics (`moe.MoEStats`,
one row per MoE block), which the train step needs for the balancing bias.
"""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mhc_jax.attention import attention_impl_for
from mhc_jax.config import ModelConfig
from mhc_jax.connections import Coefficients, ExitCollapse, make_connection
from mhc_jax.layers import Attention, RMSNorm, SwiGLU, dense_init, rope_tables
from mhc_jax.mla import MLA
from mhc_jax.moe import MoE
from mhc_jax.pipeline import PipelineConfig, run_pipeline
from mhc_jax.recompute import block_groups, optimal_group
from mhc_jax.streams import expand_stream_rows, expand_streams, post_res_mix, pre_mix

STREAM_AXES = ("batch", "length", "streams", "embed")
TOKEN_ROW_AXES = ("batch", "length", None)  # the streams as token rows (B, S, n*C)

# Remat policies by config name. `mhc_block` is the paper's block recompute (docs/math.md §8)
# with L_r = one block (2 sublayers; `recompute_blocks` groups more, see recompute.py): it keeps
# the sublayers' projection outputs (dots without batch dims) and their outputs `y`, and
# rebuilds the n-stream tensors, norms and other elementwise values from the block input in the
# backward pass. (A name-based "save all but the streams" policy does not work here: the streams
# are also residuals of the custom VJPs in `streams.py`, which carry no name. The policy above
# halves the compiled temporary memory at d_model 512.)
_CP = jax.checkpoint_policies
REMAT_POLICIES = {
    "full": _CP.nothing_saveable,
    "dots": _CP.dots_with_no_batch_dims_saveable,
    "mhc_block": _CP.save_from_both_policies(_CP.dots_with_no_batch_dims_saveable,
                                             _CP.save_only_these_names("sublayer_out")),
}


def resolve_impl(cfg: ModelConfig) -> str:
  """`cfg.mhc_impl`, falling back to XLA (with a warning) where the kernels do not apply."""
  if cfg.mhc_impl != "pallas" or cfg.connection != "mhc" or cfg.n_streams == 1:
    return "xla"
  import kernels_pallas  # pylint: disable=g-import-not-at-top
  try:
    kernels_pallas.check_supported(cfg.n_streams, cfg.d_model)
  except ValueError as e:
    logging.warning("model.mhc_impl='pallas' unavailable (%s); using the XLA path.", e)
    return "xla"
  return "pallas"


class Block(nn.Module):
  """One Transformer block: two connection layers (attention, then SwiGLU or MoE).

  Returns `(x, (coeffs, moe_stats))`; `coeffs` is None unless `return_coeffs`, `moe_stats` None
  unless `moe`.
  """
  cfg: ModelConfig
  impl: str = "xla"
  return_coeffs: bool = False
  moe: bool = False
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, x_BxSxNxC, block_index, sin_SxR, cos_SxR):
    cfg, dt = self.cfg, self.cfg.activation_dtype
    attention = MLA if cfg.attention == "mla" else Attention
    stats = []

    def moe_sublayer(u):
      y, s = MoE(cfg, self.mesh, name="moe")(u)
      stats.append(s)
      return y

    sublayers = (("attn", lambda u: attention(cfg, self.mesh, name="attn")(u, sin_SxR, cos_SxR)),
                 ("mlp", moe_sublayer if self.moe else lambda u: SwiGLU(cfg, name="mlp")(u)))
    # Parameters do not depend on the implementation: initialise through XLA (the kernels'
    # shard_map would not split the one-sequence init batch over the mesh).
    impl = "xla" if self.is_initializing() else self.impl
    all_coeffs = []
    for k, (name, sublayer) in enumerate(sublayers):
      x_BxSxNxC = nn.with_logical_constraint(
          x_BxSxNxC, TOKEN_ROW_AXES if impl == "pallas" else STREAM_AXES)
      coeffs = make_connection(cfg, f"{name}_conn", impl, self.mesh)(
          x_BxSxNxC, 2 * block_index + k)
      u_BxSxC = pre_mix(x_BxSxNxC, coeffs.h_pre, impl=impl, mesh=self.mesh)
      y_BxSxC = sublayer(RMSNorm(cfg.norm_eps, dt, name=f"{name}_norm")(u_BxSxC))
      y_BxSxC = checkpoint_name(y_BxSxC, "sublayer_out")
      x_BxSxNxC = post_res_mix(x_BxSxNxC, y_BxSxC, coeffs.h_post, coeffs.h_res, impl=impl,
                               mesh=self.mesh)
      all_coeffs.append(coeffs)
    stacked = jax.tree.map(lambda *c: jnp.stack(c), *all_coeffs) if self.return_coeffs else None
    return x_BxSxNxC, (stacked, stats[0] if stats else None)


def _block_stack(cfg: ModelConfig, impl: str, return_coeffs: bool, moe: bool, mesh, length: int,
                 initializing: bool, name: str, unroll: bool = False) -> nn.Module:
  """`length` scanned blocks, `(x, block_index_L, sin, cos) -> (x, per-block outputs)`: one
  rematerialised block per step, or groups of `recompute_blocks` (recompute.py). `unroll`
  flattens the scan (a pipeline chunk: lets the compiler overlap a send with its compute)."""
  block_cls = Block
  if cfg.remat_policy != "none":
    block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
  group = min(length, cfg.recompute_blocks or optimal_group(cfg.n_streams, length))
  if group > 1 and not initializing:
    return block_groups(Block, (cfg, impl, return_coeffs, moe, mesh), length, group,
                        REMAT_POLICIES[cfg.remat_policy], name=name)
  return nn.scan(
      block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
      in_axes=(0, nn.broadcast, nn.broadcast), length=length, unroll=length if unroll else 1,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )(cfg, impl, return_coeffs, moe, mesh, name=name)


class _Chunk(nn.Module):
  """One pipeline chunk: `length` blocks of the dense stack, from its `blocks` params."""
  cfg: ModelConfig
  impl: str
  length: int
  mesh: jax.sharding.Mesh | None = None  # for the kernels' shard_map (mHC, splash)
  unroll: bool = True

  @nn.compact
  def __call__(self, x_BxSxNxC, block_index_L, sin_SxR, cos_SxR):
    stack = _block_stack(self.cfg, self.impl, False, False, self.mesh, self.length, False,
                         "blocks", unroll=self.unroll)
    return stack(x_BxSxNxC, block_index_L, sin_SxR, cos_SxR)[0]


class DecoderLM(nn.Module):
  """Decoder-only LM; `__call__(tokens (B, S)) -> logits (B, S, V)` in float32.

  `mesh`: the device mesh of the run, for expert parallelism over its `expert` axis and the
  pipeline over its `stage` axis (`pipeline`, pipeline.py); None runs every expert on every
  device and no pipeline.
  """
  cfg: ModelConfig
  mesh: jax.sharding.Mesh | None = None
  pipeline: PipelineConfig = PipelineConfig()

  def _pipelined(self, x_BxSxNxC, sin_SxR, cos_SxR, impl):
    """The dense stack through the pipeline over the mesh's `stage` axis."""
    chunks = self.mesh.shape["stage"] * self.pipeline.repeats
    length = self.cfg.num_layers // chunks
    # Unrolled, the compiler may overlap a send with the chunk's compute. Not with kernels in
    # their own shard_map (mHC's, splash): nested in the pipeline's, Shardy mis-partitions
    # consecutive ones once unrolled (an XLA check fails). Rolled, XLA:TPU still overlaps the
    # sends (tests/test_compile.py).
    attention = attention_impl_for(self.mesh, self.cfg.attention_impl, x_BxSxNxC.shape[1],
                                   self.cfg.activation_dtype)
    nested = impl == "pallas" or attention == "splash"
    chunk = _Chunk(self.cfg, impl, length, self.mesh, unroll=not nested)

    def chunk_fn(params, x, chunk_index):
      index_L = chunk_index * length + jnp.arange(length)
      # No logical constraints inside the stage: shard_map sets a mesh, which would turn the
      # parameter metadata's constraints on (outside, with no mesh set, they are no-ops too).
      with nn.logical_axis_rules(()):
        return chunk.apply({"params": {"blocks": params}}, x, index_L, sin_SxR, cos_SxR)

    return run_pipeline(chunk_fn, self.variables["params"]["blocks"], x_BxSxNxC, self.mesh,
                        self.pipeline)

  @nn.compact
  def __call__(self, tokens_BxS: jax.Array, *, return_coeffs: bool = False,
               return_moe_stats: bool = False):
    cfg, dt = self.cfg, self.cfg.activation_dtype
    if return_coeffs and return_moe_stats:
      raise ValueError("return_coeffs and return_moe_stats cannot both be set.")
    x_BxSxC = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=dt, name="embed",
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    ("vocab", "embed")))(tokens_BxS)
    sin_SxR, cos_SxR = rope_tables(tokens_BxS.shape[1], cfg.rope_dim, cfg.rope_theta)

    impl = resolve_impl(cfg)
    # With the kernels the streams travel between blocks as token rows (B, S, n*C): a
    # (B, S, n, C) array is tiled over (n, C) on TPU, so every kernel would need a relayout copy.
    token_rows = impl == "pallas" and not self.is_initializing()
    x_BxSxNxC = (expand_stream_rows if token_rows else expand_streams)(x_BxSxC, cfg.n_streams)
    dense_blocks = cfg.num_layers - cfg.moe_blocks
    staged = self.mesh is not None and self.mesh.shape.get("stage", 1) > 1
    outputs = []  # (coeffs, moe_stats) of each stack, layers first
    for name, moe, start, length in (("blocks", False, 0, dense_blocks),
                                     ("moe_blocks", True, dense_blocks, cfg.moe_blocks)):
      if not length:
        continue
      if staged and not return_coeffs and not self.is_initializing():
        x_BxSxNxC, out = self._pipelined(x_BxSxNxC, sin_SxR, cos_SxR, impl), (None, None)
      elif cfg.scan_layers:
        stack = _block_stack(cfg, impl, return_coeffs, moe, self.mesh, length,
                             self.is_initializing(), name)
        x_BxSxNxC, out = stack(x_BxSxNxC, jnp.arange(start, start + length), sin_SxR, cos_SxR)
      else:
        block_cls = Block
        if cfg.remat_policy != "none":
          block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy])
        per_block = []
        for i in range(length):
          x_BxSxNxC, o = block_cls(cfg, impl, return_coeffs, moe, self.mesh, name=f"{name}_{i}")(
              x_BxSxNxC, start + i, sin_SxR, cos_SxR)
          per_block.append(o)
        out = jax.tree.map(lambda *o: jnp.stack(o), *per_block)
      outputs.append(out)

    if token_rows:
      x_BxSxNxC = x_BxSxNxC.reshape(*x_BxSxC.shape[:-1], cfg.n_streams, cfg.d_model)
    y_BxSxC = RMSNorm(cfg.norm_eps, dt, name="final_norm")(ExitCollapse(cfg, name="exit")(x_BxSxNxC))
    logits_BxSxV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, name="lm_head",
                            kernel_init=dense_init(cfg.d_model, ("embed", "vocab")))(y_BxSxC)
    logits_BxSxV = logits_BxSxV.astype(jnp.float32)
    if return_moe_stats:
      return logits_BxSxV, outputs[-1][1] if cfg.moe_blocks else None
    if not return_coeffs:
      return logits_BxSxV
    # (num_layers, 2, ...) -> (2 * num_layers, ...): one entry per connection layer, in order.
    coeffs = jax.tree.map(lambda *c: jnp.concatenate(c), *(o[0] for o in outputs))
    return logits_BxSxV, Coefficients(*(c.reshape(-1, *c.shape[2:]) for c in coeffs))
