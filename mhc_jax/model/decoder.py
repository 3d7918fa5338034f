"""Decoder-only language model whose sublayers are wrapped by a residual, HC or mHC connection.

tokens -> embed -> expand to n streams -> nn.scan over blocks (attention, MLP; each a connection
layer) -> exit collapse -> final RMSNorm -> untied LM head. With `return_coeffs=True` the per-layer
coefficients come out of the scan as outputs of shape `(2 * num_layers, B, S, ...)`.

Attention is grouped-query (`Attention`) or latent (`MLA`). With `num_experts > 0` the first
`dense_blocks` blocks keep the dense MLP (scan `blocks`) and the rest use a mixture of experts
(scan `moe_blocks`); `return_moe_stats=True` returns their routing statistics (`moe.MoEStats`,
one row per MoE block), which the train step needs for the balancing bias.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mhc_jax import linen as mhc
from mhc_jax.model.config import ModelConfig
from mhc_jax.model.layers import RMSNorm, dense_init, rope_tables
from mhc_jax.model.moe import MoEStats, bias_update
from mhc_jax.model.stack import block_stack
from mhc_jax.parallel import platform
from mhc_jax.parallel.pipeline import PipelineConfig, run_pipeline


def resolve_impl(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> str:
  """`cfg.mhc_impl` on `mesh`'s devices: 'pallas' where the kernels apply, else 'xla'."""
  return platform.mhc_impl(cfg.mhc_impl, connection=cfg.connection, n_streams=cfg.n_streams,
                           d_model=cfg.d_model, mesh=mesh)


class DecoderLM(nn.Module):
  """Decoder-only LM; `__call__(tokens (B, S)) -> logits (B, S, V)` in float32.

  `mesh`: the device mesh of the run, for expert parallelism over its `expert` axis and the
  pipeline over its `stage` axis (`pipeline`, `mhc_jax/parallel/pipeline.py`); None runs every
  expert on every device and no pipeline.
  """
  cfg: ModelConfig
  mesh: jax.sharding.Mesh | None = None
  pipeline: PipelineConfig = PipelineConfig()

  def _pipelined(self, streams, sin_SxR, cos_SxR, impl):
    """The dense stack through the pipeline over the mesh's `stage` axis."""
    chunks = self.mesh.shape["stage"] * self.pipeline.repeats
    length = self.cfg.num_layers // chunks
    # Unrolled, the compiler may overlap a send with the chunk's compute. Not with kernels in
    # their own shard_map (mHC's, splash): nested in the pipeline's, Shardy mis-partitions
    # consecutive ones once unrolled (an XLA check fails). Rolled, XLA:TPU still overlaps the
    # sends (tests/test_compile.py).
    attention = platform.attention_impl(self.cfg.attention_impl, seq_len=streams.shape[1],
                                        dtype=self.cfg.activation_dtype, mesh=self.mesh)
    nested = impl == "pallas" or attention == "splash"
    chunk = block_stack(self.cfg, length=length, name=None, impl=impl, mesh=self.mesh,
                        mode="scan" if nested else "unrolled_scan")

    def chunk_fn(params, x, chunk_index):
      index_L = chunk_index * length + jnp.arange(length)
      # No logical constraints inside the stage: shard_map sets a mesh, which would turn the
      # parameter metadata's constraints on (outside, with no mesh set, they are no-ops too).
      with nn.logical_axis_rules(()):
        return chunk.apply({"params": params}, x, index_L, sin_SxR, cos_SxR)[0]

    return run_pipeline(chunk_fn, self.variables["params"]["blocks"], streams, self.mesh,
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

    impl = resolve_impl(cfg, self.mesh)
    # With the kernels the streams travel between blocks as token rows (B, S, n*C): a
    # (B, S, n, C) array is tiled over (n, C) on TPU, so every kernel would need a relayout copy.
    token_rows = impl == "pallas" and not self.is_initializing()
    streams = mhc.expand(x_BxSxC, cfg.n_streams, token_rows=token_rows)  # x_BxSxNC or x_BxSxNxC
    dense_blocks = cfg.num_layers - cfg.moe_blocks
    staged = self.mesh is not None and self.mesh.shape.get("stage", 1) > 1
    outputs = []  # (coeffs, moe_stats) of each stack, layers first
    for name, moe, start, length in (("blocks", False, 0, dense_blocks),
                                     ("moe_blocks", True, dense_blocks, cfg.moe_blocks)):
      if not length:
        continue
      if staged and not return_coeffs and not self.is_initializing():
        streams, out = self._pipelined(streams, sin_SxR, cos_SxR, impl), (None, None)
      else:
        stack = block_stack(cfg, length=length, name=name, impl=impl, mesh=self.mesh, moe=moe,
                            return_coeffs=return_coeffs, mode="scan" if cfg.scan_layers else "loop",
                            initializing=self.is_initializing())
        streams, out = stack(streams, jnp.arange(start, start + length), sin_SxR, cos_SxR)
      outputs.append(out)

    x_BxSxNxC = streams.reshape(*x_BxSxC.shape[:-1], cfg.n_streams, cfg.d_model)
    y_BxSxC = mhc.Collapse(cfg.exit_mode, cfg.mhc_eps, cfg.mhc_alpha_init, logical_axes=True,
                           name="exit")(x_BxSxNxC)
    y_BxSxC = RMSNorm(cfg.norm_eps, dt, name="final_norm")(y_BxSxC)
    logits_BxSxV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, name="lm_head",
                            kernel_init=dense_init(cfg.d_model, ("embed", "vocab")))(y_BxSxC)
    logits_BxSxV = logits_BxSxV.astype(jnp.float32)
    if return_moe_stats:
      return logits_BxSxV, outputs[-1][1] if cfg.moe_blocks else None
    if not return_coeffs:
      return logits_BxSxV
    # (num_layers, 2, ...) -> (2 * num_layers, ...): one entry per connection layer, in order.
    coeffs = jax.tree.map(lambda *c: jnp.concatenate(c), *(o[0] for o in outputs))
    return logits_BxSxV, mhc.Coefficients(*(c.reshape(-1, *c.shape[2:]) for c in coeffs))


def apply_balance_update(params: dict, stats: MoEStats | None) -> dict:
  """`DecoderLM` params with every MoE block's balancing bias moved by `moe.bias_update(stats)`.

  Scanned stacks hold the biases stacked under `moe_blocks`; looped ones under `moe_blocks_{i}`.
  """
  if stats is None:
    return params
  update_LxE = bias_update(stats)
  params = dict(params)

  def moved(block, update):
    return dict(block, moe=dict(block["moe"], balance_bias=block["moe"]["balance_bias"] + update))

  if "moe_blocks" in params:
    params["moe_blocks"] = moved(params["moe_blocks"], update_LxE)
  else:
    for i in range(update_LxE.shape[0]):
      params[f"moe_blocks_{i}"] = moved(params[f"moe_blocks_{i}"], update_LxE[i])
  return params
