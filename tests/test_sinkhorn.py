"""sinkhorn_knopp against the float64 spec implementation, its properties and its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import sinkhorn_knopp
from tests.reference_np import numerical_vjp, sinkhorn_np


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("scale", [0.1, 3.0, 20.0])
def test_matches_float64_spec(n, scale):
  logits = scale * np.random.default_rng(n).normal(size=(5, 3, n, n)).astype(np.float32)
  got = sinkhorn_knopp(jnp.asarray(logits))
  assert got.dtype == jnp.float32 and got.shape == logits.shape
  np.testing.assert_allclose(got, sinkhorn_np(logits), atol=2e-6, rtol=0)


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_rows_exact_columns_converge_nonnegative(eps):
  logits = jnp.asarray(3 * np.random.default_rng(0).normal(size=(64, 4, 4)), jnp.float32)
  col_err = []
  for iters in (1, 3, 20):
    m = sinkhorn_knopp(logits, num_iters=iters, eps=eps)
    assert float(jnp.min(m)) >= 0.0
    # Rows are normalised last, dividing by `sum + eps`: with eps > 0 a row whose sum s was
    # small ends at 1 - eps / s, so exactness to 1e-6 holds once iterations have balanced it.
    if eps == 0.0 or iters == 20:
      np.testing.assert_allclose(jnp.sum(m, -1), 1.0, atol=2e-6)
    col_err.append(float(jnp.max(jnp.abs(jnp.sum(m, -2) - 1.0))))
  assert col_err[0] > col_err[1] > col_err[2]
  assert col_err[2] < 0.1


def test_n1_is_one_and_eps_zero_is_the_paper_formula():
  np.testing.assert_allclose(sinkhorn_knopp(jnp.array([[[7.0]]])), [[[1.0]]], atol=2e-6)
  logits = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32)
  np.testing.assert_allclose(sinkhorn_knopp(logits, eps=0.0), sinkhorn_np(logits, eps=0.0),
                             atol=1e-6)


def test_bfloat16_input_runs_in_float32():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4, 4)), jnp.bfloat16)
  got = sinkhorn_knopp(logits)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, sinkhorn_np(np.asarray(logits, np.float32)), atol=2e-6)


@pytest.mark.parametrize("n,iters", [(2, 20), (3, 20), (4, 5)])
def test_gradient_matches_float64_finite_differences(n, iters):
  rng = np.random.default_rng(n)
  logits = 2 * rng.normal(size=(2, n, n))
  ct = rng.normal(size=(2, n, n))
  _, vjp = jax.vjp(lambda l: sinkhorn_knopp(l, num_iters=iters), jnp.asarray(logits, jnp.float32))
  got = vjp(jnp.asarray(ct, jnp.float32))[0]
  want = numerical_vjp(lambda l: sinkhorn_np(l, iters), [logits], ct, 0)
  np.testing.assert_allclose(got, want, atol=2e-5 * max(1.0, np.abs(want).max()))


def test_gradient_goes_through_every_iteration():
  # Differentiating only the last normalisation would give a different gradient.
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 4)), jnp.float32)
  g20 = jax.grad(lambda l: sinkhorn_knopp(l)[0, 1])(logits)
  g1 = jax.grad(lambda l: sinkhorn_knopp(l, num_iters=1)[0, 1])(logits)
  assert float(jnp.max(jnp.abs(g20 - g1))) > 1e-3


@pytest.mark.parametrize("bad", [(4,), (3, 4), (2, 3, 4)])
def test_bad_shapes_raise(bad):
  with pytest.raises(ValueError, match="shape"):
    sinkhorn_knopp(jnp.zeros(bad))
  with pytest.raises(ValueError, match="num_iters"):
    sinkhorn_knopp(jnp.zeros((2, 2)), num_iters=0)
