"""Training FLOPs counted from the model config (XLA's cost analysis counts a scanned layer once).

Counts multiply-adds as 2 FLOPs, the backward pass as twice the forward, and attention scores over
the full `S x S` (what the XLA attention computes, causal mask or not). A mixture of experts counts
the experts a token is routed to (active parameters), not all of them. Recompute (remat) is not
counted: these are model FLOPs, the numerator of MFU.
"""

import math

from mhc_jax.model.config import ModelConfig


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


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
  """Forward `(projection, score)` FLOPs per token of one attention sublayer."""
  c, h = cfg.d_model, cfg.num_heads
  if cfg.attention == "mla":
    qk, dv, lora = cfg.qk_nope_dim + cfg.qk_rope_dim, cfg.v_head_dim, cfg.kv_lora_rank
    q_in = cfg.q_lora_rank or c
    macs = (c * cfg.q_lora_rank + q_in * h * qk + c * (lora + cfg.qk_rope_dim)
            + lora * h * (cfg.qk_nope_dim + dv) + h * dv * c)
    return 2 * macs, 2 * seq_len * h * (qk + dv)
  kv = cfg.kv_heads * cfg.head_dim
  return 2 * (2 * c * c + 2 * c * kv), 2 * 2 * seq_len * c


def moe_flops_per_token(cfg: ModelConfig) -> float:
  """Forward FLOPs per token of one MoE sublayer: router, `k` routed and the shared experts."""
  c = cfg.d_model
  experts = cfg.experts_per_token + cfg.num_shared_experts
  return 2 * c * cfg.num_experts + 2 * 3 * c * cfg.expert_dim * experts


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
  """Forward FLOPs per token, by part of the model."""
  c, layers = cfg.d_model, cfg.num_layers
  projections, scores = attention_flops_per_token(cfg, seq_len)
  out = {
      "attention_projections": layers * projections,
      "attention_scores": layers * scores,  # q k^T and p v over the full S x S
      "mlp": (layers - cfg.moe_blocks) * 2 * 3 * c * cfg.hidden_dim,
      "experts": cfg.moe_blocks * moe_flops_per_token(cfg),
      "connections": layers * 2 * connection_flops_per_token(cfg),
  }
  exit_gate = 2 * cfg.n_streams * c * cfg.n_streams if cfg.connection != "residual" else 0
  out["exit_and_head"] = exit_gate + 2 * c * cfg.vocab_size
  return out


def train_flops_per_step(cfg: ModelConfig, seq_len: int, batch_size: int) -> float:
  """Forward + backward FLOPs of one optimizer step over `batch_size x seq_len` tokens."""
  return 3 * sum(forward_flops_per_token(cfg, seq_len).values()) * seq_len * batch_size
