"""Sinkhorn–Knopp projection of logits onto (approximately) doubly stochastic matrices.

math.md §4: paper orientation (`M[i, j]` is the weight of input stream `j` in output stream `i`),
columns normalised first and rows last, so row sums are exact and column sums approximate.
With the default `eps = 1e-6` this matches DeepSeek's released reference in float32; `eps = 0`
gives the paper's Eq. 9.

The matrices are processed tokens-last, `(n, n, T)`, so every normalisation is an elementwise
pass over token vectors that XLA fuses; the hand-written VJP differentiates through every
iteration, recomputing the iterates from the logits instead of storing them.
"""

import functools

import jax
import jax.numpy as jnp

DEFAULT_NUM_ITERS = 20
DEFAULT_EPS = 1e-6
_ROW_SUM, _COL_SUM = 1, 0  # axes of the (n, n, T) layout to sum for row / column sums


def _forward_iterates(l_NxNxT: jax.Array, num_iters: int, eps: float):
  """Returns `(softmax, [(input, axis), ...] of every normalisation, final matrix)`."""
  p = jax.nn.softmax(l_NxNxT, axis=_COL_SUM)
  m, steps = p + eps, []
  for axis in (_ROW_SUM,) + (_COL_SUM, _ROW_SUM) * (num_iters - 1):
    steps.append((m, axis))
    m = m / (jnp.sum(m, axis=axis, keepdims=True) + eps)
  return p, steps, m


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _sinkhorn_tokens_last(l_NxNxT, num_iters, eps):
  return _forward_iterates(l_NxNxT, num_iters, eps)[2]


def _sinkhorn_fwd(l_NxNxT, num_iters, eps):
  return _sinkhorn_tokens_last(l_NxNxT, num_iters, eps), l_NxNxT


def _sinkhorn_bwd(num_iters, eps, l_NxNxT, g_NxNxT):
  p, steps, _ = _forward_iterates(l_NxNxT, num_iters, eps)
  for m_in, axis in reversed(steps):
    denom = jnp.sum(m_in, axis=axis, keepdims=True) + eps
    out = m_in / denom
    g_NxNxT = (g_NxNxT - jnp.sum(g_NxNxT * out, axis=axis, keepdims=True)) / denom
  dl = p * (g_NxNxT - jnp.sum(g_NxNxT * p, axis=_COL_SUM, keepdims=True))
  return (dl,)


_sinkhorn_tokens_last.defvjp(_sinkhorn_fwd, _sinkhorn_bwd)


def sinkhorn_knopp(
    logits: jax.Array, *, num_iters: int = DEFAULT_NUM_ITERS, eps: float = DEFAULT_EPS
) -> jax.Array:
  """Maps `(..., n, n)` logits to a matrix with exact unit row sums; always float32.

  The first column normalisation is a max-shifted softmax over each column, followed by
  `num_iters` row and `num_iters - 1` column normalisations, each dividing by `sum + eps`.
  """
  if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
    raise ValueError(
        f"sinkhorn_knopp: logits must have shape (..., n, n); got {logits.shape}. "
        "Reshape the n*n logits of H_res to (n, n) row-major first."
    )
  if num_iters < 1:
    raise ValueError(f"sinkhorn_knopp: num_iters must be >= 1; got {num_iters}.")
  n, lead = logits.shape[-1], logits.shape[:-2]
  l_NxNxT = jnp.moveaxis(logits.astype(jnp.float32).reshape(-1, n, n), 0, -1)
  m_NxNxT = _sinkhorn_tokens_last(l_NxNxT, int(num_iters), float(eps))
  return jnp.moveaxis(m_NxNxT, -1, 0).reshape(*lead, n, n)
