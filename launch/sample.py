r"""Samples text from a trained model.

  python -m launch.sample --workdir=runs/mhc_small --prompt='def ' --max_new_tokens=200

loads the latest checkpoint of `--workdir` (`checkpoint.load_for_inference`), encodes the prompt
with the tokenizer of the run's corpus, and prints the prompt followed by the sampled text.
`--temperature=0` is greedy. The model sees at most `--context` tokens at a time (default: the
run's `seq_len` from `<workdir>/config.json`, else the whole text).
"""

import sys
from collections.abc import Sequence

from absl import app
from absl import flags
import jax

from mhc_jax.model.decoder import DecoderLM
from mhc_jax.training import checkpoint, corpus
from mhc_jax.training.metrics import run_config_field
from mhc_jax.training.sampling import generate

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (with checkpoints).")
_PROMPT = flags.DEFINE_string("prompt", "def ", "Text the sample continues.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens; 0 keeps all.")
_CONTEXT = flags.DEFINE_integer(
    "context", 0, "Most tokens the model sees at once; 0: the run's seq_len if known, else all.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def sample(workdir: str, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int = 0,
           context: int = 0, seed: int = 0) -> str:
  """The text sampled after `prompt` from the latest checkpoint of `workdir`."""
  model_cfg, params, data_dir = checkpoint.load_for_inference(workdir)
  meta = corpus.read_meta(data_dir)
  tokens = generate(
      DecoderLM(model_cfg), params, corpus.encode(prompt, meta)[None],
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
      rng=jax.random.key(seed), context=context or run_config_field(workdir, "seq_len"))
  return corpus.decode(tokens, meta)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass everything as flags.")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: the directory of a training run.")
  try:
    text = sample(_WORKDIR.value, _PROMPT.value, max_new_tokens=_MAX_NEW_TOKENS.value,
                  temperature=_TEMPERATURE.value, top_k=_TOP_K.value, context=_CONTEXT.value,
                  seed=_SEED.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(_PROMPT.value + text)


if __name__ == "__main__":
  app.run(main)
