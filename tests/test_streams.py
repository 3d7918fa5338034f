"""pre_mix / post_res_mix (and their hand-written VJPs) against float64 einsum references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import expand_streams, post_res_mix, pre_mix


def _ref_pre(x, h_pre):
  return jnp.einsum("...nc,...n->...c", x, h_pre)


def _ref_post(x, y, h_post, h_res):
  return jnp.einsum("...ij,...jc->...ic", h_res, x) + h_post[..., :, None] * y[..., None, :]


def _args(n, c=16, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(2, 3, n, c)), rng.normal(size=(2, 3, c)), rng.uniform(size=(2, 3, n)),
          rng.uniform(size=(2, 3, n, n)))


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_values_and_vjps_match_float64(n):
  x, y, h_post, h_res = _args(n)
  f32 = lambda *a: [jnp.asarray(v, jnp.float32) for v in a]
  np.testing.assert_allclose(pre_mix(*f32(x, h_post)), _ref_pre(x, h_post), atol=1e-5)
  np.testing.assert_allclose(post_res_mix(*f32(x, y, h_post, h_res)),
                             _ref_post(x, y, h_post, h_res), atol=1e-5)
  rng = np.random.default_rng(1)
  ct_pre, ct_post = rng.normal(size=y.shape), rng.normal(size=x.shape)
  got = jax.vjp(pre_mix, *f32(x, h_post))[1](jnp.asarray(ct_pre, jnp.float32))
  with jax.enable_x64():
    want = jax.vjp(_ref_pre, x, h_post)[1](ct_pre)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4)
  got = jax.vjp(post_res_mix, *f32(x, y, h_post, h_res))[1](jnp.asarray(ct_post, jnp.float32))
  with jax.enable_x64():
    want = jax.vjp(_ref_post, x, y, h_post, h_res)[1](ct_post)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4)


def test_bfloat16_streams_keep_their_dtype():
  x, y, h_post, h_res = _args(4)
  xb, yb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
  out = post_res_mix(xb, yb, jnp.asarray(h_post, jnp.float32), jnp.asarray(h_res, jnp.float32))
  assert out.dtype == jnp.bfloat16
  want = _ref_post(np.asarray(xb, np.float32), np.asarray(yb, np.float32), h_post, h_res)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=1e-2, atol=1e-2)
  grads = jax.grad(lambda a, b: jnp.sum(post_res_mix(a, b, h_post, h_res)), (0, 1))(xb, yb)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


def test_expand_replicates():
  x = jnp.arange(6.0).reshape(1, 2, 3)
  out = expand_streams(x, 4)
  assert out.shape == (1, 2, 4, 3)
  np.testing.assert_array_equal(out[:, :, 2], x)
