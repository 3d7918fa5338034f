"""Float64 NumPy implementations of math.md §3–4, written independently of the JAX code."""

import numpy as np


def sinkhorn_np(logits, num_iters=20, eps=1e-6):
  """math.md §4 on `(..., n, n)` float64 logits."""
  l = np.asarray(logits, np.float64)
  e = np.exp(l - l.max(axis=-2, keepdims=True))
  m = e / e.sum(axis=-2, keepdims=True) + eps
  m = m / (m.sum(axis=-1, keepdims=True) + eps)
  for _ in range(num_iters - 1):
    m = m / (m.sum(axis=-2, keepdims=True) + eps)
    m = m / (m.sum(axis=-1, keepdims=True) + eps)
  return m


def coefficients_np(x, phi, alpha, bias, num_iters=20, eps=1e-6, post_scale=2.0):
  """math.md §3 on `x (..., n, C)` in float64; returns `(h_pre, h_post, h_res)`."""
  x = np.asarray(x, np.float64)
  n, c = x.shape[-2:]
  v = x.reshape(*x.shape[:-2], n * c)
  r = 1.0 / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps)
  a = np.concatenate([np.full(n, alpha[0]), np.full(n, alpha[1]), np.full(n * n, alpha[2])])
  h = a * (v @ np.asarray(phi, np.float64)) * r + np.asarray(bias, np.float64)
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  h_pre = sig(h[..., :n]) + eps
  h_post = post_scale * sig(h[..., n:2 * n])
  h_res = sinkhorn_np(h[..., 2 * n:].reshape(*h.shape[:-1], n, n), num_iters, eps)
  return h_pre, h_post, h_res


def numerical_vjp(f, args, cotangent, argnum, h=1e-6):
  """Central finite-difference `<cotangent, df/dargs[argnum]>` in float64."""
  args = [np.array(a, np.float64) for a in args]
  base = args[argnum]
  grad = np.zeros_like(base)
  for idx in np.ndindex(base.shape):
    plus, minus = base.copy(), base.copy()
    plus[idx] += h
    minus[idx] -= h
    fp = f(*[plus if i == argnum else a for i, a in enumerate(args)])
    fm = f(*[minus if i == argnum else a for i, a in enumerate(args)])
    grad[idx] = np.sum(cotangent * (fp - fm)) / (2 * h)
  return grad


def lite_coefficients_np(x, phi, alpha, bias, eps=1e-6, post_scale=2.0):
  """mHC-lite (math.md §6) in float64: `H_res[i, perm_p[i]] += softmax(h_res)_p`, a loop per perm."""
  import itertools  # pylint: disable=g-import-not-at-top
  x = np.asarray(x, np.float64)
  n, c = x.shape[-2:]
  perms = list(itertools.permutations(range(n)))
  v = x.reshape(*x.shape[:-2], n * c)
  r = 1.0 / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps)
  a = np.concatenate([np.full(n, alpha[0]), np.full(n, alpha[1]), np.full(len(perms), alpha[2])])
  h = a * (v @ np.asarray(phi, np.float64)) * r + np.asarray(bias, np.float64)
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  logits = h[..., 2 * n:]
  w = np.exp(logits - logits.max(axis=-1, keepdims=True))
  w = w / w.sum(axis=-1, keepdims=True)
  h_res = np.zeros((*h.shape[:-1], n, n))
  for k, perm in enumerate(perms):
    for i in range(n):
      h_res[..., i, perm[i]] += w[..., k]
  return sig(h[..., :n]) + eps, post_scale * sig(h[..., n:2 * n]), h_res
