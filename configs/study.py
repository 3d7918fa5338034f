"""The stability study: residual vs HC vs mHC vs mHC-lite at equal width, depth, data, steps, LR.

  python -m launch.study --workdir=runs/study                      # about 30 min on a 2-core CPU
  python -m launch.study --workdir=runs/study --print_commands     # one launch.train per run

Writes `summary.json`, `README.md` (the table) and `study.png` (the paper's Fig. 3/7/8 panels, loss
gap, grad norm) into the workdir; each run trains in `<workdir>/<variant>/seed<k>/`. A rerun skips
finished runs and resumes interrupted ones. Variants (comma separated, as in configs/default.py):
  --config=configs/study.py:full     sized for one accelerator (d_model 512, 16 blocks, 3000 steps)
  --config=configs/study.py:quick    a few minutes on CPU, one seed (the stability notebook)
  --config=configs/study.py:smoke    seconds, for tests
Any field can be overridden: --config.seeds=3, --config.train.optimizer.lr=3e-3, ...
"""

import ml_collections

from configs import default
from configs.loader import parse_arg
from mhc_jax.model.config import CONNECTIONS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The study config; `arg` is a comma-separated list of variants (see docstring)."""
  c = ml_collections.ConfigDict()
  c.variants = ",".join(CONNECTIONS)  # Connections compared (comma separated).
  c.seeds = 2  # Runs per variant, with seeds first_seed, first_seed + 1, ...
  c.first_seed = 0  # Seed (params init and data order) of the first run of each variant.
  c.n_streams = 4  # Expansion rate of hc / mhc / mhc_lite (residual has 1).
  c.spike_factor = 2.0  # A grad-norm spike: a logged value > factor x median of the window before.
  c.spike_window = 10  # Logged grad norms in that window (log_every steps apart).

  # The training run of every variant: configs/default.py with these fields changed. A high LR
  # and 16 sublayers make HC's unconstrained composite gain grow within a few hundred steps.
  c.train = default.get_config()  # The launch.train config every run starts from.
  c.train.model.d_model = 128
  c.train.model.num_heads = 2
  c.train.model.num_layers = 8
  c.train.optimizer.lr = 1e-2
  c.train.total_steps = 300
  c.train.seq_len = 128
  c.train.eval_every = 50
  c.train.diag_every = 25
  c.train.log_every = 5
  c.train.checkpoint_every = 100

  for preset in parse_arg(arg, presets=("full", "quick", "smoke"),
                          example="configs/study.py:quick").presets:
    _apply_preset(c, preset)
  return c


def _apply_preset(c: ml_collections.ConfigDict, variant: str) -> None:
  t = c.train
  if variant == "full":
    t.model.d_model, t.model.num_heads, t.model.num_layers = 512, 8, 16
    t.model.dtype = "bfloat16"
    t.batch_size, t.seq_len, t.total_steps = 64, 1024, 3000
    t.eval_every, t.diag_every, t.log_every, t.checkpoint_every = 250, 100, 10, 500
    c.seeds = 3
  elif variant == "quick":
    t.batch_size, t.seq_len, t.total_steps = 8, 128, 100
    t.eval_every, t.diag_every, t.log_every, t.checkpoint_every = 50, 10, 2, 100
    t.eval_batches = 4
    c.seeds = 1
  else:  # smoke
    t.model.d_model, t.model.num_heads, t.model.num_layers = 32, 2, 2
    t.batch_size, t.seq_len, t.total_steps = 4, 32, 8
    t.eval_every = t.diag_every = t.checkpoint_every = 4
    t.log_every, t.eval_batches = 1, 2
    t.optimizer.warmup_steps = 2
    c.seeds, c.spike_window = 1, 3
