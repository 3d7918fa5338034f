"""Default run: a small 4-stream mHC byte-level LM on the embedded Python-stdlib corpus.

  make train    # = python -m launch.train --config=configs/default.py --workdir=runs/default

About 10 minutes on a 2-core CPU. Variants through the config argument (comma separated):
  --config=configs/default.py:residual        plain pre-norm residual baseline (n = 1)
  --config=configs/default.py:hc              Hyper-Connections (Zhu et al.), n = 4
  --config=configs/default.py:mhc_lite        mHC-lite: H_res mixes the n! permutations (n <= 4)
  --config=configs/default.py:mhc,n=2         mHC with 2 streams
  --config=configs/default.py:d=512           wider model (d_model 512, 8 heads)
  --config=configs/default.py:smoke           tiny and fast, for tests
Any field can also be set with --config.field=value, e.g. --config.model.sinkhorn_iters=10.
"""

import ml_collections

from configs.loader import parse_arg
from mhc_jax.model.config import CONNECTIONS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the run config; `arg` is a comma-separated list of variants (see docstring)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Params init and data shuffle.
  c.total_steps = 300  # Optimizer steps.
  c.batch_size = 16  # Global batch (sequences), split over processes and devices.
  c.seq_len = 256  # Tokens per sequence.
  c.grad_accum_steps = 1  # Gradient accumulation: the batch runs in this many slices per step.
  c.eval_every = 100  # Validation loss every this many steps (and at the end).
  c.eval_batches = 8  # Validation batches per evaluation.
  c.checkpoint_every = 100  # Checkpoint period (and at the end, and on SIGTERM).
  c.keep_checkpoints = 3  # Newest checkpoints kept.
  c.diag_every = 50  # Amax-gain diagnostics on a fixed validation batch.
  c.log_every = 10  # metrics.jsonl / TensorBoard / progress period.

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 256  # Bytes.
  c.model.d_model = 256  # Width C of each stream.
  c.model.num_layers = 4  # Transformer blocks (2 connection layers each).
  c.model.num_heads = 4  # Query heads.
  c.model.num_kv_heads = 0  # 0 = num_heads (no grouping).
  c.model.mlp_dim = 0  # 0 = 8/3 d_model rounded to 64.
  c.model.dtype = "float32"  # Activation dtype (bfloat16 on accelerators).
  c.model.connection = "mhc"  # residual | hc | mhc | mhc_lite.
  c.model.n_streams = 4  # Expansion rate n.
  c.model.sinkhorn_iters = 20  # Sinkhorn–Knopp iterations.
  c.model.mhc_exit = "gated"  # gated | sum | mean.
  c.model.mhc_res_identity_bias = 0.0  # tau of b_res = tau I.
  c.model.mhc_dynamic = True  # False: static mHC.
  c.model.mhc_impl = "xla"  # xla | pallas.
  c.model.attention_impl = "auto"  # auto (TPU splash, GPU cuDNN, else XLA) | xla | cudnn | splash.
  c.model.remat_policy = "none"  # none | full | dots | mhc_block.
  c.model.recompute_blocks = 1  # Blocks per recomputed group (L_r); 0 = the optimum.
  c.model.scan_layers = True  # nn.scan over blocks.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 3e-3  # Peak learning rate.
  c.optimizer.warmup_steps = 30  # Linear warmup.
  c.optimizer.schedule = "cosine"  # cosine | step (paper: x0.316 at 80%, x0.1 at 90%).
  c.optimizer.min_lr_ratio = 0.1  # Cosine floor as a fraction of lr.
  c.optimizer.b1 = 0.9  # AdamW beta1.
  c.optimizer.b2 = 0.95  # AdamW beta2.
  c.optimizer.eps = 1e-8  # AdamW epsilon.
  c.optimizer.weight_decay = 0.1  # Decoupled decay (not on norms, biases, mHC/HC statics).
  c.optimizer.grad_clip = 1.0  # Global-norm clipping.

  c.data = ml_collections.ConfigDict()
  c.data.dir = ""  # Token corpus from launch/prepare_data.py; "" = embedded stdlib corpus.
  c.data.cache_dir = ""  # Where the stdlib corpus is cached; "" = ~/.cache/mhc_jax.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel devices (-1 = all that expert x model leave).
  c.mesh.fsdp = 1  # FSDP devices: batch splits, parameters and optimizer state shard (ZeRO-3).
  c.mesh.expert = 1  # Expert-parallel devices (MoE models, configs/paper.py); batch splits too.
  c.mesh.model = 1  # Tensor-parallel devices.
  c.mesh.stage = 1  # Pipeline stages: the blocks split over them (dense models).

  c.pipeline = ml_collections.ConfigDict()  # Used when mesh.stage > 1 (mhc_jax/pipeline.py).
  c.pipeline.microbatches = 1  # Microbatches in flight through the stages.
  c.pipeline.schedule = "gpipe"  # gpipe | circular (each microbatch passes the ring `repeats` times).
  c.pipeline.repeats = 1  # Chunks per stage (circular: >= 2).
  c.pipeline.overlap_sends = False  # True: send while computing the next microbatch (fill x2).

  a = parse_arg(arg, presets=(*CONNECTIONS, "smoke"), n=0, d=0,
                example="configs/default.py:hc,n=2")
  for preset in a.presets:
    if preset in CONNECTIONS:
      c.model.connection = preset
      c.model.n_streams = 1 if preset == "residual" else max(c.model.n_streams, 2)
    else:
      _smoke(c)
  if a.n:
    c.model.n_streams = a.n
  if a.d:
    c.model.d_model = a.d
    c.model.num_heads = max(a.d // 64, 1)
  return c


def _smoke(cfg: ml_collections.ConfigDict) -> None:
  """Tiny and fast, for tests."""
  cfg.total_steps, cfg.batch_size, cfg.seq_len = 12, 4, 32
  cfg.eval_every = cfg.checkpoint_every = cfg.diag_every = 6
  cfg.log_every, cfg.eval_batches = 2, 2
  cfg.model.d_model, cfg.model.num_layers, cfg.model.num_heads = 32, 2, 2
  cfg.optimizer.warmup_steps = 2
