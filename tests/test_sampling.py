"""Tests of `sampling.generate` (against a naive argmax loop) and of `launch/sample.py`.

Every case shares one model and few shapes: compilation, not compute, is the cost here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.model.config import ModelConfig
from mhc_jax.model.decoder import DecoderLM
from mhc_jax.training import corpus
from mhc_jax.training.sampling import generate

CFG = ModelConfig(vocab_size=256, d_model=32, num_layers=1, num_heads=2, connection="mhc",
                  n_streams=2, sinkhorn_iters=3)
PROMPT_1xP = np.array([list(b"def ")], np.int32)
NUM_NEW = 4


@pytest.fixture(scope="module")
def model_and_params():
  """The model, its initial params, and params with a sharper head (no near-tie argmaxes)."""
  model = DecoderLM(CFG)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), PROMPT_1xP)["params"])
  sharp = jax.tree.map(lambda x: x, params)
  sharp["lm_head"]["kernel"] = sharp["lm_head"]["kernel"] * 30.0
  return model, params, sharp


def _naive_greedy(model, params, prompt_1xP, num_new, context=None):
  """Appends the argmax of the model run on exactly the visible tokens, one token at a time."""
  apply = jax.jit(lambda p, tokens_1xS: model.apply({"params": p}, tokens_1xS))
  tokens = list(prompt_1xP[0])
  for _ in range(num_new):
    visible = tokens[-context:] if context else tokens
    tokens.append(int(jnp.argmax(apply(params, jnp.asarray([visible], jnp.int32))[0, -1])))
  return np.asarray(tokens[prompt_1xP.shape[1]:])


@pytest.mark.parametrize("context", [None, 3])
def test_greedy_matches_naive_loop(model_and_params, context):
  model, _, params = model_and_params
  out = generate(model, params, PROMPT_1xP, max_new_tokens=NUM_NEW, temperature=0.0,
                 rng=jax.random.key(1), context=context)
  assert out.shape == (NUM_NEW,) and out.dtype == np.int32
  np.testing.assert_array_equal(out, _naive_greedy(model, params, PROMPT_1xP, NUM_NEW, context))
  again = generate(model, params, PROMPT_1xP[0], max_new_tokens=NUM_NEW, temperature=0.0,
                   rng=jax.random.key(2), context=context)
  np.testing.assert_array_equal(out, again)  # Greedy ignores the rng; a 1-D prompt works too.


def test_sampling_is_reproducible_and_in_vocab(model_and_params):
  model, params, _ = model_and_params
  kwargs = dict(max_new_tokens=NUM_NEW, temperature=1.0)
  a = generate(model, params, PROMPT_1xP, rng=jax.random.key(7), **kwargs)
  b = generate(model, params, PROMPT_1xP, rng=jax.random.key(7), **kwargs)
  c = generate(model, params, PROMPT_1xP, rng=jax.random.key(8), **kwargs)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.shape == (NUM_NEW,) and a.min() >= 0 and a.max() < CFG.vocab_size


def test_top_1_is_greedy(model_and_params):
  model, params, _ = model_and_params
  top1 = generate(model, params, PROMPT_1xP, max_new_tokens=NUM_NEW, temperature=2.0, top_k=1,
                  rng=jax.random.key(3))
  greedy = generate(model, params, PROMPT_1xP, max_new_tokens=NUM_NEW, temperature=0.0,
                    rng=jax.random.key(3))
  np.testing.assert_array_equal(top1, greedy)


@pytest.mark.parametrize("prompt,kwargs,match", [
    (np.zeros((1, 0), np.int32), {}, "non-empty"),
    (np.zeros((2, 3), np.int32), {}, r"shape \(2, 3\)"),
    (np.array([[1, 256]]), {}, "vocab_size=256"),
    (PROMPT_1xP, dict(max_new_tokens=0), "max_new_tokens=0"),
    (PROMPT_1xP, dict(temperature=-0.1), "temperature=-0.1"),
    (PROMPT_1xP, dict(temperature=float("nan")), "temperature=nan"),
    (PROMPT_1xP, dict(top_k=257), "top_k=257"),
    (PROMPT_1xP, dict(context=0), "context=0"),
])
def test_invalid_args(model_and_params, prompt, kwargs, match):
  model, params, _ = model_and_params
  kwargs = dict(dict(max_new_tokens=2, rng=jax.random.key(0)), **kwargs)
  with pytest.raises(ValueError, match=match):
    generate(model, params, prompt, **kwargs)


def test_launch_sample(tmp_path, monkeypatch, model_and_params):
  from mhc_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from launch import sample  # pylint: disable=g-import-not-at-top
  model, _, params = model_and_params
  data_dir = tmp_path / "data"
  meta = corpus.write_corpus(data_dir, {"train": [np.arange(256)], "val": [np.arange(10)]},
                             vocab_size=256, tokenizer="bytes", source="test")
  calls = []
  monkeypatch.setattr(checkpoint, "load_for_inference",
                      lambda workdir: calls.append(workdir) or (CFG, params, str(data_dir)))
  (tmp_path / "config.json").write_text('{"data": {"seq_len": 3}}')  # The sampling context.
  text = sample.sample(str(tmp_path), "def ", max_new_tokens=NUM_NEW, temperature=0.0)
  assert calls == [str(tmp_path)]
  expected = generate(model, params, PROMPT_1xP, max_new_tokens=NUM_NEW, temperature=0.0,
                      rng=jax.random.key(0), context=3)
  assert text == corpus.decode(expected, meta)
