"""mHC-lite: exactly doubly stochastic `H_res`, against a float64 loop reference and finite
differences; the n <= 4 limit is a clear error."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import lite_coefficients, permutation_mixture
from mhc_jax.core.permutations import num_lite_logits, permutation_matrices
from mhc_jax.model.config import ModelConfig
from tests.reference_np import lite_coefficients_np, numerical_vjp


def _inputs(n, c, lead=(2, 3), seed=0):
  rng = np.random.default_rng(seed)
  k = num_lite_logits(n)
  x = rng.normal(size=(*lead, n, c)).astype(np.float32)
  phi = (rng.normal(size=(n * c, k)) / np.sqrt(n * c)).astype(np.float32)
  alpha = np.array([0.7, 1.3, 2.0], np.float32)
  bias = (0.3 * rng.normal(size=k)).astype(np.float32)
  return x, phi, alpha, bias


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_rows_and_columns_sum_to_one(n, scale):
  logits = scale * jax.random.normal(jax.random.key(n), (64, math.factorial(n)))
  h = np.asarray(permutation_mixture(logits, n), np.float64)
  assert h.shape == (64, n, n) and h.min() >= 0
  # Both marginals to float32 rounding: unlike Sinkhorn, the columns are not approximate.
  np.testing.assert_allclose(h.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(h.sum(-2), 1.0, atol=1e-6)


def test_one_stream_is_identity():
  np.testing.assert_array_equal(permutation_mixture(jnp.array([[3.7]]), 1), [[[1.0]]])


def test_dominant_logit_selects_its_permutation():
  n = 3
  for p in range(math.factorial(n)):
    logits = jnp.zeros(math.factorial(n)).at[p].set(50.0)
    np.testing.assert_allclose(permutation_mixture(logits, n), permutation_matrices(n)[p],
                               atol=1e-12)


@pytest.mark.parametrize("n,c", [(1, 8), (2, 16), (3, 8), (4, 32)])
def test_coefficients_match_float64_reference(n, c):
  args = _inputs(n, c)
  got = lite_coefficients(*map(jnp.asarray, args))
  for g, w in zip(got, lite_coefficients_np(*args)):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, atol=3e-6, rtol=1e-5)


@pytest.mark.parametrize("argnum", [0, 1, 2, 3])  # x, phi, alpha, bias
def test_gradient_matches_float64_finite_differences(argnum):
  n, c = 3, 4
  args = _inputs(n, c, lead=(2,), seed=1)
  rng = np.random.default_rng(7)
  cotangents = [rng.normal(size=s) for s in [(2, n), (2, n), (2, n, n)]]
  _, vjp = jax.vjp(lambda *a: lite_coefficients(*a), *map(jnp.asarray, args))
  got = vjp(tuple(jnp.asarray(t, jnp.float32) for t in cotangents))[argnum]

  def scalar_np(*a):
    return sum(np.sum(t * o) for t, o in zip(cotangents, lite_coefficients_np(*a)))
  want = numerical_vjp(lambda *a: np.array(scalar_np(*a)), args, np.array(1.0), argnum)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-3)


def test_more_than_four_streams_is_a_clear_error():
  with pytest.raises(ValueError, match=r"n=5 .* use 1 <= n <= 4"):
    permutation_matrices(5)
  with pytest.raises(ValueError, match=r"model.n_streams=5 .* n_streams <= 4"):
    ModelConfig(connection="mhc_lite", n_streams=5)
