"""mHC-lite: `H_res` as a convex combination of the `n!` permutation matrices (math.md §6).

Birkhoff–von Neumann: every doubly stochastic matrix is a convex combination of permutation
matrices. mHC-lite (arXiv:2601.05732) parametrises `H_res` that way directly, with softmax weights
over all `n!` permutations, so `H_res` is doubly stochastic exactly (up to float rounding) with no
iterations. `n!` logits per token make it practical only for `n <= 4` (24 permutations).

The logits are laid out `[pre (n) | post (n) | res (n!)]`, permutations in `itertools` order, so
with a zero bias `H_res` starts uniform `1/n`, as mHC does. The identity is permutation 0.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.core.coefficients import dynamic_logits, expand_alpha
from mhc_jax.core.sinkhorn import DEFAULT_EPS

MAX_STREAMS = 4


def _check_n(n: int) -> None:
  if not 1 <= n <= MAX_STREAMS:
    raise ValueError(f"mhc_lite: n={n} streams would mix {math.factorial(n) if n > 0 else 0} "
                     f"permutations; use 1 <= n <= {MAX_STREAMS} (or connection='mhc').")


@functools.cache
def permutation_matrices(n: int) -> np.ndarray:
  """`(n!, n, n)` float32: `P[p, i, perm_p[i]] = 1`, output stream i takes input perm_p[i]."""
  _check_n(n)
  perms = list(itertools.permutations(range(n)))
  p = np.zeros((len(perms), n, n), np.float32)
  for k, perm in enumerate(perms):
    p[k, np.arange(n), perm] = 1.0
  return p


def num_lite_logits(n: int) -> int:
  """Width of mHC-lite's projection: n (pre) + n (post) + n! (permutation weights)."""
  _check_n(n)
  return 2 * n + math.factorial(n)


def permutation_mixture(logits_xP: jax.Array, n: int) -> jax.Array:
  """`(..., n!)` logits -> `(..., n, n)` `H_res = sum_p softmax(logits)_p P_p`, float32."""
  w_xP = jax.nn.softmax(logits_xP.astype(jnp.float32), axis=-1)
  return jnp.einsum("...p,pij->...ij", w_xP, jnp.asarray(permutation_matrices(n)),
                    precision=jax.lax.Precision.HIGHEST)


def lite_coefficients(
    x: jax.Array, phi: jax.Array, alpha: jax.Array, bias: jax.Array, *,
    eps: float = DEFAULT_EPS, post_scale: float = 2.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(h_pre (..., n), h_post (..., n), h_res (..., n, n))` from streams `x (..., n, C)`.

  As `mhc_coefficients` (the same flattened-RMS projection, sigmoid gates), with the Sinkhorn
  projection replaced by `permutation_mixture`. `phi`: `(n*C, 2n + n!)`; `alpha`: `(3,)`.
  """
  n, c = x.shape[-2:]
  k = num_lite_logits(n)
  if phi.shape != (n * c, k) or alpha.shape != (3,) or bias.shape != (k,):
    raise ValueError(
        f"lite_coefficients: for x of shape {x.shape} expected phi {(n * c, k)}, alpha (3,), "
        f"bias ({k},); got {phi.shape}, {alpha.shape}, {bias.shape}.")
  h = dynamic_logits(x, phi, expand_alpha(alpha, n, k - 2 * n), bias, eps)
  return lite_coefficients_from_logits(h, n, eps=eps, post_scale=post_scale)


def lite_coefficients_from_logits(
    h: jax.Array, n: int, *, eps: float = DEFAULT_EPS, post_scale: float = 2.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Splits `(..., 2n + n!)` logits into `(h_pre, h_post, h_res)` (static mHC-lite uses this)."""
  h = h.astype(jnp.float32)
  h_pre = jax.nn.sigmoid(h[..., :n]) + eps
  h_post = post_scale * jax.nn.sigmoid(h[..., n:2 * n])
  return h_pre, h_post, permutation_mixture(h[..., 2 * n:], n)
