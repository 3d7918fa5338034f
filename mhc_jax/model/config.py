"""Model configuration: one frozen dataclass that validates itself at construction."""

import dataclasses
from typing import Any

import jax.numpy as jnp

from mhc_jax.connection.spec import COLLAPSES as EXITS
from mhc_jax.connection.spec import KINDS as CONNECTIONS
from mhc_jax.connection.spec import ConnectionSpec
from mhc_jax.core.permutations import MAX_STREAMS as MAX_LITE_STREAMS
from mhc_jax.parallel.platform import ATTENTION_IMPLS, MHC_IMPLS, MOE_IMPLS

REMAT_POLICIES = ("none", "full", "dots", "mhc_block")
ATTENTIONS = ("gqa", "mla")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _fail(field: str, value: Any, fix: str):
  raise ValueError(f"model.{field}={value!r} is invalid: {fix}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only LM whose sublayers are wrapped by a residual, HC or mHC connection."""
  vocab_size: int = 256  # Token vocabulary (256 for bytes).
  d_model: int = 256  # Width C of each residual stream.
  num_layers: int = 4  # Transformer blocks; each is 2 connection layers (attention, MLP).
  num_heads: int = 4  # Query heads.
  num_kv_heads: int = 0  # Key/value heads for grouped-query attention; 0 means num_heads.
  mlp_dim: int = 0  # SwiGLU hidden width; 0 means 8/3 * d_model rounded up to 64.
  rope_theta: float = 10_000.0  # RoPE base frequency.
  norm_eps: float = 1e-6  # Epsilon of the sublayer RMSNorms.
  dtype: str = "float32"  # Activation dtype; params are always float32.
  connection: str = "mhc"  # residual | hc | mhc | mhc_lite.
  n_streams: int = 4  # Expansion rate n; must be 1 for residual.
  sinkhorn_iters: int = 20  # Sinkhorn–Knopp iterations for H_res.
  mhc_eps: float = 1e-6  # eps of the coefficient RMS, of H_pre and of Sinkhorn (math.md §3).
  mhc_alpha_init: float = 0.01  # Initial alpha_pre/post/res (paper Table 5).
  mhc_res_identity_bias: float = 0.0  # tau in b_res = tau * I; 0 starts H_res uniform.
  mhc_dynamic: bool = True  # False gives static mHC (coefficients from the bias only).
  mhc_exit: str = "gated"  # gated | sum | mean collapse of the streams at the exit.
  mhc_impl: str = "xla"  # xla | pallas (fused kernels; falls back to xla if C % 128 != 0).
  hc_scale: float = 0.01  # s of the dynamic HC terms (Zhu et al.).
  remat_policy: str = "none"  # none | full | dots | mhc_block (paper's block recompute).
  # Blocks per recomputed group (the paper's L_r, counted in blocks of 2 sublayers; see
  # recompute.py); 0 picks the optimum sqrt(nL / (2(n+2))) per stack. Needs a remat_policy.
  recompute_blocks: int = 1
  scan_layers: bool = True  # nn.scan over blocks; False unrolls a Python loop (for tests).
  # Attention: grouped-query (gqa) or DeepSeek's multi-head latent attention (mla).
  attention: str = "gqa"  # gqa | mla.
  # How attention runs: auto (TPU splash kernel, GPU cuDNN flash, else XLA), xla, cudnn, splash.
  attention_impl: str = "auto"
  q_lora_rank: int = 0  # MLA query compression rank; 0 projects queries at full rank.
  kv_lora_rank: int = 512  # MLA key-value compression rank.
  qk_nope_dim: int = 128  # MLA per-head query/key width without RoPE.
  qk_rope_dim: int = 64  # MLA per-head RoPE width (the RoPE key is shared by all heads).
  v_head_dim: int = 128  # MLA per-head value width.
  # Mixture of experts (DeepSeek-V3 style); num_experts = 0 keeps every MLP dense.
  num_experts: int = 0  # Routed experts.
  experts_per_token: int = 6  # Routed experts each token is sent to (top-k).
  num_shared_experts: int = 2  # Experts every token goes through.
  expert_dim: int = 896  # Hidden width of each (routed and shared) expert.
  dense_blocks: int = 1  # Leading blocks that keep the dense MLP.
  routed_scaling: float = 1.0  # Factor on the routed experts' output.
  balance_rate: float = 1e-3  # gamma: step of the loss-free balancing bias per train step.
  balance_loss_weight: float = 0.0  # Weight of the sequence-wise balance loss (0 = off).
  # Grouped matmul of the experts: auto (megablox kernels on TPU, ragged_dot elsewhere),
  # ragged_dot or megablox (see grouped_matmul.py).
  moe_impl: str = "auto"

  def __post_init__(self):
    for field in ("vocab_size", "d_model", "num_layers", "num_heads"):
      if getattr(self, field) < 1:
        _fail(field, getattr(self, field), "must be a positive integer.")
    if self.d_model % self.num_heads:
      _fail("d_model", self.d_model,
            f"must be divisible by num_heads={self.num_heads}; change either.")
    if self.head_dim % 2:
      _fail("d_model", self.d_model,
            f"d_model / num_heads = {self.head_dim} must be even for RoPE.")
    if self.num_kv_heads < 0 or self.num_heads % self.kv_heads:
      _fail("num_kv_heads", self.num_kv_heads,
            f"must divide num_heads={self.num_heads} (0 means num_heads).")
    if self.connection not in CONNECTIONS:
      _fail("connection", self.connection, f"choose one of {CONNECTIONS}.")
    if self.n_streams < 1:
      _fail("n_streams", self.n_streams, "must be >= 1 (the paper uses 4).")
    if self.connection == "residual" and self.n_streams != 1:
      _fail("n_streams", self.n_streams, "connection='residual' has one stream; set n_streams=1.")
    if self.connection == "mhc_lite" and self.n_streams > MAX_LITE_STREAMS:
      _fail("n_streams", self.n_streams,
            f"mhc_lite mixes all n! permutation matrices; use n_streams <= {MAX_LITE_STREAMS} "
            "or connection='mhc'.")
    if self.sinkhorn_iters < 1:
      _fail("sinkhorn_iters", self.sinkhorn_iters, "must be >= 1 (the paper uses 20).")
    if self.mhc_exit not in EXITS:
      _fail("mhc_exit", self.mhc_exit, f"choose one of {EXITS}.")
    if self.mhc_impl not in MHC_IMPLS:
      _fail("mhc_impl", self.mhc_impl, f"choose one of {MHC_IMPLS}.")
    if self.remat_policy not in REMAT_POLICIES:
      _fail("remat_policy", self.remat_policy, f"choose one of {REMAT_POLICIES}.")
    if self.recompute_blocks < 0:
      _fail("recompute_blocks", self.recompute_blocks,
            "must be >= 0 (blocks per recomputed group; 0 picks the optimum).")
    if self.recompute_blocks != 1 and self.remat_policy == "none":
      _fail("recompute_blocks", self.recompute_blocks,
            "groups blocks for recompute; set remat_policy='mhc_block' (or full/dots) too.")
    if self.recompute_blocks != 1 and not self.scan_layers:
      _fail("recompute_blocks", self.recompute_blocks,
            "groups scanned blocks; set scan_layers=True or recompute_blocks=1.")
    if self.attention_impl not in ATTENTION_IMPLS:
      _fail("attention_impl", self.attention_impl, f"choose one of {ATTENTION_IMPLS}.")
    if self.attention not in ATTENTIONS:
      _fail("attention", self.attention, f"choose one of {ATTENTIONS}.")
    if self.attention == "mla":
      for field in ("kv_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_head_dim"):
        if getattr(self, field) < 1:
          _fail(field, getattr(self, field), "must be a positive integer for attention='mla'.")
      if self.qk_rope_dim % 2:
        _fail("qk_rope_dim", self.qk_rope_dim, "must be even for RoPE.")
    if self.q_lora_rank < 0:
      _fail("q_lora_rank", self.q_lora_rank, "must be >= 0 (0 = no query compression).")
    if self.moe_impl not in MOE_IMPLS:
      _fail("moe_impl", self.moe_impl, f"choose one of {MOE_IMPLS}.")
    if self.num_experts < 0:
      _fail("num_experts", self.num_experts, "must be >= 0 (0 = dense MLPs only).")
    if self.num_experts:
      if not 1 <= self.experts_per_token <= self.num_experts:
        _fail("experts_per_token", self.experts_per_token,
              f"must be between 1 and num_experts={self.num_experts}.")
      if self.expert_dim < 1 or self.num_shared_experts < 0:
        _fail("expert_dim" if self.expert_dim < 1 else "num_shared_experts",
              self.expert_dim if self.expert_dim < 1 else self.num_shared_experts,
              "expert_dim must be >= 1 and num_shared_experts >= 0.")
      if not 0 <= self.dense_blocks < self.num_layers:
        _fail("dense_blocks", self.dense_blocks,
              f"must be between 0 and num_layers - 1 = {self.num_layers - 1} so that at least "
              "one block has experts.")
    if self.dtype not in DTYPES:
      _fail("dtype", self.dtype, f"choose one of {tuple(DTYPES)}.")

  @property
  def connection_spec(self) -> ConnectionSpec:
    """The settings of every connection layer of the model."""
    return ConnectionSpec(kind=self.connection, n=self.n_streams, sinkhorn_iters=self.sinkhorn_iters,
                          eps=self.mhc_eps, alpha_init=self.mhc_alpha_init,
                          res_identity_bias=self.mhc_res_identity_bias, dynamic=self.mhc_dynamic,
                          hc_scale=self.hc_scale, norm_eps=self.norm_eps)

  @property
  def exit_mode(self) -> str:
    """How the streams leave: residual and HC sum them (math.md §5-6), mHC uses `mhc_exit`."""
    return "sum" if self.connection in ("residual", "hc") else self.mhc_exit

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def rope_dim(self) -> int:
    """Width of the rotated part of each query/key head."""
    return self.qk_rope_dim if self.attention == "mla" else self.head_dim

  @property
  def moe_blocks(self) -> int:
    """Blocks whose MLP is a mixture of experts."""
    return self.num_layers - self.dense_blocks if self.num_experts else 0

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def hidden_dim(self) -> int:
    return self.mlp_dim or 64 * -(-8 * self.d_model // (3 * 64))

  @property
  def activation_dtype(self):
    return DTYPES[self.dtype]

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    """Builds from a (ConfigDict-like) mapping, naming unknown fields instead of a TypeError."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"model config has unknown fields {unknown}; known fields: {sorted(known)}.")
    return cls(**dict(d))
