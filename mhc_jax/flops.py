"""Training FLOPs counted from the model config (XLA's cost analysis counts a scanned layer once).

Counts multiply-adds as 2 FLOPs, the backward pass as twice the forward, and attention scores over
the full `S x S` (what the XLA attention computes, causal mask or not). Recompute (remat) is not
counted: these are model FLOPs, the numerator of MFU.
"""

import math

from mhc_jax.config import ModelConfig


def connection_flops_per_token(cfg: ModelConfig) -> float:
  """Forward FLOPs per token of one connection layer: coefficients and both stream mixes."""
  n, c = cfg.n_streams, cfg.d_model
  if cfg.connection == "residual":
    return 0.0
  mixes = 2 * n * c + (2 * n * n * c + 2 * n * c)  # pre_mix; H_res x + H_post^T y
  if cfg.connection == "hc":
    return mixes + 2 * n * c * (n + 2)  # per-stream tanh(x W) with W: (C, n + 2)
  res_logits = math.factorial(n) if cfg.connection == "mhc_lite" else n * n
  sinkhorn = 0 if cfg.connection == "mhc_lite" else 4 * n * n * cfg.sinkhorn_iters
  return mixes + 2 * n * c * (2 * n + res_logits) + sinkhorn


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
  """Forward FLOPs per token, by part of the model."""
  c, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
  per_block = {
      "attention_projections": 2 * (2 * c * c + 2 * c * kv),
      "attention_scores": 2 * 2 * seq_len * c,  # q k^T and p v, full S x S
      "mlp": 2 * 3 * c * cfg.hidden_dim,
      "connections": 2 * connection_flops_per_token(cfg),
  }
  out = {k: v * cfg.num_layers for k, v in per_block.items()}
  exit_gate = 2 * cfg.n_streams * c * cfg.n_streams if cfg.connection != "residual" else 0
  out["exit_and_head"] = exit_gate + 2 * c * cfg.vocab_size
  return out


def train_flops_per_step(cfg: ModelConfig, seq_len: int, batch_size: int) -> float:
  """Forward + backward FLOPs of one optimizer step over `batch_size x seq_len` tokens."""
  return 3 * sum(forward_flops_per_token(cfg, seq_len).values()) * seq_len * batch_size
