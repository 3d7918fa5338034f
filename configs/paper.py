"""The paper's models (mHC, arXiv:2512.24880, Table 5): DeepSeek-V3-style MoE + MLA at 3B/9B/27B.

  python -m launch.train --config=configs/paper.py:tiny --workdir=runs/paper_tiny   # ~10 min, 2-core CPU
  python -m launch.compile --config=configs/paper.py:3b,mhc --target=v5p-8          # fits?

On a pod, run launch.train with `--config=configs/paper.py:3b,mhc --multihost` on every worker.

Sizes (comma separated with the variants below):
  3b    12 blocks, C 1280, 16 heads, 64 routed / 6 active / 2 shared experts of width 896
  9b    18 blocks, C 1920, 24 heads, 64 / 6 / 2 experts of width 1280
  27b   30 blocks, C 2560, 32 heads, 72 / 6 / 2 experts of width 1536
  tiny  the same architecture (MoE + MLA + mHC) small enough to train here on the embedded corpus
  smoke seconds, for tests
Connections: residual | hc | mhc (default) | mhc_lite. Shared by all sizes: MLA (head dim 128,
KV rank 512, RoPE dim 64, theta 10000), vocabulary 129,280 with an untied head, one leading dense
block, loss-free balancing, n = 4, alpha init 0.01, 20 Sinkhorn iterations, AdamW (0.9, 0.95),
weight decay 0.1, 2000 warmup steps, step decay x0.316 at 80% and x0.1 at 90%, sequences of 4096.

Not given by the paper and chosen here (say so when you compare): queries at full rank
(`q_lora_rank=0`, as DeepSeek-V2-Lite at this size); the dense block's MLP width = (active +
shared experts) x expert width, so that it costs what an MoE block does; routed scaling 1.0;
balancing rate 1e-3 and sequence balance loss weight 1e-4 (DeepSeek-V3's values). The mesh
(`mesh.expert`, remat policy) is the smallest v5p slice on which the compile-only build fits; see
benchmarks/README.md. The byte-level embedded corpus works with any vocabulary; for a real run
point `--config.data.dir` at tokens prepared with your tokenizer (launch/prepare_data.py).
"""

import ml_collections

from configs import default
from configs.loader import parse_arg
from mhc_jax.model.config import CONNECTIONS

# size: (blocks, C, heads, routed experts, expert width, batch, steps, lr,
#        mesh.expert, mesh.model, grad_accum_steps, remat). The mesh and accumulation are those of the
#        smallest v5p slice the compile-only build fits on (benchmarks/README.md): v5p-8 (4 chips) for 3B
#        and 9B, v5p-32 (16 chips, tensor parallel 2) for 27B. On another slice set
#        --config.grad_accum_steps=batch / (chips / mesh.model): one sequence per chip per microbatch.
SIZES = {
    "3b": (12, 1280, 16, 64, 896, 320, 30_000, 8.6e-4, 4, 1, 80, "full"),
    "9b": (18, 1920, 24, 64, 1280, 512, 50_000, 5.9e-4, 4, 1, 128, "full"),
    "27b": (30, 2560, 32, 72, 1536, 1280, 50_000, 4.0e-4, 8, 2, 160, "full"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """A paper model; `arg` is a size and a connection, comma separated (default `3b,mhc`)."""
  a = parse_arg(arg, presets=(*SIZES, "tiny", "smoke", *CONNECTIONS),
                example="configs/paper.py:3b,hc")
  sizes = [v for v in a.presets if v not in CONNECTIONS]
  connections = [v for v in a.presets if v in CONNECTIONS]
  c = default.get_config(connections[-1] if connections else "mhc")
  _paper_architecture(c)
  for size in sizes or ["3b"]:
    if size in SIZES:
      _paper_size(c, *SIZES[size])
    else:
      _small(c, smoke=size == "smoke")
  return c


def _paper_architecture(c: ml_collections.ConfigDict) -> None:
  """What all three paper models share (Table 5)."""
  m = c.model
  m.vocab_size = 129_280  # The DeepSeek-V3 tokenizer's vocabulary; embedding and head untied.
  m.dtype = "bfloat16"  # Activations; params float32.
  m.attention = "mla"  # Multi-head latent attention.
  m.q_lora_rank = 0  # Queries at full rank (see the docstring).
  m.kv_lora_rank = 512  # KV compression rank.
  m.qk_nope_dim = 128  # Per-head attention dim.
  m.qk_rope_dim = 64  # Decoupled RoPE dim, one key shared by all heads.
  m.v_head_dim = 128  # Per-head value dim.
  m.experts_per_token = 6  # Active routed experts.
  m.num_shared_experts = 2  # Shared experts.
  m.dense_blocks = 1  # Leading blocks with a dense MLP.
  m.routed_scaling = 1.0  # Factor on the routed output.
  m.balance_rate = 1e-3  # Loss-free balancing bias step (DeepSeek-V3).
  m.balance_loss_weight = 1e-4  # Sequence-wise balance loss (DeepSeek-V3).
  m.moe_impl = "auto"  # Grouped matmul: megablox kernels on TPU, ragged_dot elsewhere.
  m.mhc_alpha_init = 0.01  # alpha init.
  m.sinkhorn_iters = 20  # Sinkhorn-Knopp iterations.
  c.seq_len = 4096  # Tokens per sequence.
  o = c.optimizer
  o.schedule = "step"  # x0.316 at 80%, x0.1 at 90%.
  o.warmup_steps = 2000
  o.b1, o.b2, o.weight_decay = 0.9, 0.95, 0.1
  c.eval_every = c.checkpoint_every = c.diag_every = 1000  # Periods on a pod.
  c.log_every = 50  # Metrics period.
  c.mesh.expert = 1  # Expert-parallel devices (the sizes below set it).


def _paper_size(c, blocks, width, heads, experts, expert_dim, batch, steps, lr, expert_shards,
                tensor_shards, grad_accum_steps, remat):
  m = c.model
  m.num_layers, m.d_model, m.num_heads = blocks, width, heads
  m.num_experts, m.expert_dim = experts, expert_dim
  m.mlp_dim = (m.experts_per_token + m.num_shared_experts) * expert_dim  # the dense block
  m.remat_policy = remat
  c.batch_size, c.total_steps, c.optimizer.lr = batch, steps, lr
  c.mesh.expert = expert_shards  # Experts split over this many devices.
  c.mesh.model = tensor_shards  # Heads, vocabulary and dense MLP split over this many.
  c.grad_accum_steps = grad_accum_steps  # Gradient accumulation: one sequence per chip per step.


def _small(c: ml_collections.ConfigDict, smoke: bool) -> None:
  """The paper's architecture at CPU size: 16 routed experts, 2 active, 1 shared."""
  m = c.model
  m.vocab_size, m.dtype = 256, "float32"
  m.d_model, m.num_layers, m.num_heads = 128, 4, 4
  m.kv_lora_rank, m.qk_nope_dim, m.qk_rope_dim, m.v_head_dim = 64, 32, 16, 32
  m.num_experts, m.experts_per_token, m.num_shared_experts, m.expert_dim = 16, 2, 1, 128
  m.mlp_dim = 3 * 128
  m.remat_policy = "none"
  c.seq_len, c.batch_size, c.total_steps = 128, 16, 300
  c.optimizer.lr, c.optimizer.warmup_steps = 3e-3, 30
  c.eval_every = c.checkpoint_every = 100  # Periods.
  c.diag_every, c.log_every = 50, 10  # Periods.
  c.mesh.expert = c.mesh.model = 1  # One device.
  c.grad_accum_steps = 1  # No accumulation.
  if smoke:
    m.d_model, m.num_layers, m.num_heads, m.num_experts = 32, 2, 2, 4
    m.kv_lora_rank, m.qk_nope_dim, m.qk_rope_dim, m.v_head_dim, m.expert_dim = 16, 8, 4, 8, 16
    m.mlp_dim = 48
    c.seq_len, c.batch_size, c.total_steps = 32, 4, 12
    c.eval_every = c.checkpoint_every = c.diag_every = 6
    c.log_every, c.eval_batches = 2, 2
    c.optimizer.warmup_steps = 2
