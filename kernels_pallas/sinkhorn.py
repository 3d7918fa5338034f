"""Sinkhorn–Knopp and the coefficient map on the n rows of a logit matrix (math.md §3–4).

Shared by the coefficient kernels and their plain-jnp reference. Row i of an (n, n) matrix is
one array of shape `(n, ...)`: entry j on axis 0, tokens after. Row sums reduce axis 0; column
sums add the n row arrays, so there are no tiny matmuls and the same code lowers on Mosaic TPU,
Triton and the interpreter.
"""

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.common import sum_list



def _normalize_rows(m, eps, tape):
  dens = [jnp.sum(mi, axis=0, keepdims=True) + eps for mi in m]
  out = [mi / d for mi, d in zip(m, dens)]
  tape.append(("rows", out, dens))
  return out


def _normalize_cols(m, eps, tape):
  den = sum_list(m) + eps
  out = [mi / den for mi in m]
  tape.append(("cols", out, den))
  return out


def _normalize_vjp(dy, kind, y, den):
  """`y = m / (sum(m) + eps)` along rows or columns: `dm = (dy - sum(dy * y)) / den`."""
  if kind == "rows":
    return [(dyi - jnp.sum(dyi * yi, axis=0, keepdims=True)) / d
            for dyi, yi, d in zip(dy, y, den)]
  s = sum_list([dyi * yi for dyi, yi in zip(dy, y)])
  return [(dyi - s) / den for dyi in dy]


def _column_softmax(logit_rows):
  mx = jax.lax.stop_gradient(functools.reduce(jnp.maximum, logit_rows))
  e = [jnp.exp(l - mx) for l in logit_rows]
  total = sum_list(e)
  return [ei / total for ei in e]


def _iteration(m, eps, tape):
  """One (cols, rows) Sinkhorn iteration."""
  return _normalize_rows(_normalize_cols(m, eps, tape), eps, tape)


def sinkhorn_forward(logit_rows, *, num_iters, eps, loop=False):
  """Column softmax + eps, row-normalise, then (cols, rows) `num_iters - 1` times.

  Returns `(rows, residuals)`; the residuals (every iterate) feed `sinkhorn_vjp`, which is how
  the backward kernel recomputes the iterations on chip instead of reading them from HBM.
  `loop=True` runs the iterations as a loop and keeps no residuals (a forward-only kernel).
  """
  p = _column_softmax(logit_rows)
  tape = []
  m = _normalize_rows([pi + eps for pi in p], eps, tape)
  if loop:
    return jax.lax.fori_loop(0, num_iters - 1, lambda _, m: _iteration(m, eps, []), m), None
  for _ in range(num_iters - 1):
    m = _iteration(m, eps, tape)
  return m, (p, tape)


def _sinkhorn_vjp_loop(logit_rows, d_rows, *, num_iters, eps):
  """`sinkhorn_vjp` with loops, not unrolled code: iteration k's input is recomputed from the
  first iterate (about num_iters**2 / 2 iterations instead of a tape of num_iters)."""
  p = _column_softmax(logit_rows)
  first_tape = []
  m0 = _normalize_rows([pi + eps for pi in p], eps, first_tape)

  def back(j, d):
    m = jax.lax.fori_loop(0, num_iters - 2 - j, lambda _, m: _iteration(m, eps, []), m0)
    tape = []
    _iteration(m, eps, tape)
    for kind, y, den in reversed(tape):
      d = _normalize_vjp(d, kind, y, den)
    return d

  d_rows = jax.lax.fori_loop(0, num_iters - 1, back, d_rows)
  d_rows = _normalize_vjp(d_rows, *first_tape[0])
  s = sum_list([di * pi for di, pi in zip(d_rows, p)])
  return [pi * (di - s) for di, pi in zip(d_rows, p)]


def sinkhorn_vjp(logit_rows, d_rows, *, num_iters, eps, loop=False):
  """Cotangent of the logit rows given that of the output rows, through every iteration."""
  if loop:
    return _sinkhorn_vjp_loop(logit_rows, d_rows, num_iters=num_iters, eps=eps)
  _, (p, tape) = sinkhorn_forward(logit_rows, num_iters=num_iters, eps=eps)
  for kind, y, den in reversed(tape):
    d_rows = _normalize_vjp(d_rows, kind, y, den)
  s = sum_list([di * pi for di, pi in zip(d_rows, p)])
  return [pi * (di - s) for di, pi in zip(d_rows, p)]


def coefficients_from_rows(pre, post, res_rows, *, num_iters, eps, post_scale, loop=False):
  """Logits `pre (n, ...)`, `post (n, ...)`, n res rows -> `h_pre`, `h_post`, `h_res` rows."""
  h_res, _ = sinkhorn_forward(res_rows, num_iters=num_iters, eps=eps, loop=loop)
  return jax.nn.sigmoid(pre) + eps, post_scale * jax.nn.sigmoid(post), h_res


def coefficients_vjp_rows(pre, post, res_rows, g_pre, g_post, g_res_rows, *, num_iters, eps,
                          post_scale, loop=False):
  """Cotangents of the logits (same layout) given those of `h_pre`, `h_post`, `h_res`."""
  s_pre, s_post = jax.nn.sigmoid(pre), jax.nn.sigmoid(post)
  d_res = sinkhorn_vjp(res_rows, g_res_rows, num_iters=num_iters, eps=eps, loop=loop)
  return g_pre * s_pre * (1.0 - s_pre), g_post * (post_scale * s_post * (1.0 - s_post)), d_res
