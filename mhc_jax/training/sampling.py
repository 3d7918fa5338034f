"""Autoregressive sampling from a `DecoderLM` without a KV cache.

The prompt and the tokens to come live in one fixed-size buffer; each step of a jitted
`lax.fori_loop` runs the model on a window of `W` tokens of it and samples the next token from the
logits at the last filled position. The model is causal, so the unfilled tail of the window does
not change those logits. Once the text is longer than `context`, the window slides to its last
`context` tokens. One compilation serves every token of a call (and later calls of the same shapes).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sample_token(logits_V: jax.Array, rng: jax.Array, temperature: jax.Array, *,
                 greedy: bool, top_k: int) -> jax.Array:
  """Next token id from `(V,)` logits: argmax if `greedy`, else top-k tempered sampling."""
  if greedy:
    return jnp.argmax(logits_V).astype(jnp.int32)
  logits_V = logits_V / temperature
  if top_k:
    kth = jax.lax.top_k(logits_V, top_k)[0][-1]
    logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
  return jax.random.categorical(rng, logits_V).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "num_prompt", "window", "greedy", "top_k"))
def _fill_buffer(model: nn.Module, params, buffer_T: jax.Array, rng: jax.Array,
                 temperature: jax.Array, *, num_prompt: int, window: int, greedy: bool,
                 top_k: int) -> jax.Array:
  """Fills `buffer_T[num_prompt:]` one token at a time; returns the whole buffer."""
  def step(length, buffer_T):
    start = jnp.maximum(length - window, 0)
    window_1xW = jax.lax.dynamic_slice(buffer_T, (start,), (window,))[None]
    logits_1xWxV = model.apply({"params": params}, window_1xW)
    logits_V = jax.lax.dynamic_index_in_dim(logits_1xWxV[0], length - 1 - start, keepdims=False)
    token = sample_token(logits_V, jax.random.fold_in(rng, length), temperature,
                         greedy=greedy, top_k=top_k)
    return buffer_T.at[length].set(token)

  return jax.lax.fori_loop(num_prompt, buffer_T.shape[0], step, buffer_T)


def generate(model: nn.Module, params, prompt_tokens_1xP: np.ndarray | jax.Array, *,
             max_new_tokens: int, temperature: float = 0.8, top_k: int = 0, rng: jax.Array,
             context: int | None = None) -> np.ndarray:
  """Returns the `(max_new_tokens,)` int32 tokens sampled after the prompt.

  `temperature == 0` is greedy decoding; `top_k > 0` samples among the `top_k` likeliest tokens.
  `context` (the training sequence length) caps the tokens the model sees at once; `None` shows
  it the whole text. `prompt_tokens_1xP` may also be 1-D.
  """
  prompt = np.asarray(prompt_tokens_1xP)
  if prompt.ndim == 2 and prompt.shape[0] == 1:
    prompt = prompt[0]
  if prompt.ndim != 1 or prompt.size == 0:
    raise ValueError(f"generate: prompt_tokens_1xP has shape {prompt.shape}; pass a non-empty "
                     "(1, P) or (P,) array of token ids (e.g. corpus.encode(text, meta)).")
  vocab_size = model.cfg.vocab_size
  if prompt.min() < 0 or prompt.max() >= vocab_size:
    raise ValueError(f"generate: prompt token ids span [{prompt.min()}, {prompt.max()}], outside "
                     f"[0, vocab_size={vocab_size}); encode with the model's tokenizer.")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens}; pass a value >= 1.")
  if not temperature >= 0:
    raise ValueError(f"generate: temperature={temperature}; pass a value >= 0 (0 is greedy).")
  if not 0 <= top_k <= vocab_size:
    raise ValueError(f"generate: top_k={top_k}; pass 0 (no cut) or a value in [1, {vocab_size}].")
  if context is not None and context < 1:
    raise ValueError(f"generate: context={context}; pass the training seq_len (>= 1) or None.")
  total = prompt.size + max_new_tokens
  buffer_T = np.zeros((total,), np.int32)
  buffer_T[:prompt.size] = prompt
  buffer_T = _fill_buffer(
      model, params, jnp.asarray(buffer_T), rng, jnp.float32(temperature),
      num_prompt=prompt.size, window=min(context or total, total), greedy=temperature == 0,
      top_k=top_k)
  return np.asarray(buffer_T[prompt.size:])
