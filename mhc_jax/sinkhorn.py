"""Sinkhorn–Knopp projection of logits onto (approximately) doubly stochastic matrices.

Spec §4: paper orientation (`M[i, j]` is the weight of input stream `j` in output stream `i`),
columns normalised first and rows last, so row sums are exact and column sums approximate.
With the default `eps = 1e-6` this matches DeepSeek's released reference in float32; `eps = 0`
gives the paper's Eq. 9.
"""

import jax
import jax.numpy as jnp

DEFAULT_NUM_ITERS = 20
DEFAULT_EPS = 1e-6


def _normalize_rows(m: jax.Array, eps: float) -> jax.Array:
  return m / (jnp.sum(m, axis=-1, keepdims=True) + eps)


def _normalize_cols(m: jax.Array, eps: float) -> jax.Array:
  return m / (jnp.sum(m, axis=-2, keepdims=True) + eps)


def sinkhorn_knopp(
    logits: jax.Array, *, num_iters: int = DEFAULT_NUM_ITERS, eps: float = DEFAULT_EPS
) -> jax.Array:
  """Maps `(..., n, n)` logits to a matrix with exact unit row sums; always float32.

  The first column normalisation is a max-shifted softmax over each column; the loop is
  unrolled so that autodiff differentiates through every iteration (spec §4: a gradient from
  the final matrix alone is wrong at finite `num_iters`).
  """
  if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
    raise ValueError(
        f"sinkhorn_knopp: logits must have shape (..., n, n); got {logits.shape}. "
        "Reshape the n*n logits of H_res to (n, n) row-major first."
    )
  if num_iters < 1:
    raise ValueError(f"sinkhorn_knopp: num_iters must be >= 1; got {num_iters}.")
  m = jax.nn.softmax(logits.astype(jnp.float32), axis=-2) + eps
  m = _normalize_rows(m, eps)
  for _ in range(num_iters - 1):
    m = _normalize_rows(_normalize_cols(m, eps), eps)
  return m
