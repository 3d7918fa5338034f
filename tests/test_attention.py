"""Causal attention: XLA and the splash kernel (interpreted) against a float64 reference."""

import json

import jax
import numpy as np
from jax.sharding import PartitionSpec as P
from absl.testing import absltest, parameterized

from mhc_jax.model.attention import causal_attention
from tests import helpers


def _reference(q, k, v):
  """float64 numpy causal softmax attention, GQA heads grouped, scale 1/sqrt(D)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  s = q.shape[1]
  scores = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnqk,bknv->bqnv", probs, v)


def _vjp_reference(q, k, v, ct):
  """Gradients of `sum(ct * attention)` by jax in float64 (the forward is checked separately)."""
  with jax.enable_x64(True):
    args = [np.asarray(a, np.float64) for a in (q, k, v)]
    _, vjp = jax.vjp(lambda *a: causal_attention(*a, impl="xla"), *args)
    return vjp(np.asarray(ct, np.float64))


class AttentionTest(parameterized.TestCase):

  @parameterized.product(
      impl=("xla", "splash"),
      # GQA with a head width padded to 128 for splash; MLA-like unequal query and value widths.
      widths=((4, 2, 64, 64), (2, 2, 48, 32)))
  def test_matches_float64_reference(self, impl, widths):
    n, kv_heads, d, v_width = widths
    keys = jax.random.split(jax.random.key(0), 4)
    b, s = 2, 128
    q = jax.random.normal(keys[0], (b, s, n, d))
    k = jax.random.normal(keys[1], (b, s, kv_heads, d))
    v = jax.random.normal(keys[2], (b, s, kv_heads, v_width))
    ct = jax.random.normal(keys[3], (b, s, n, v_width))
    out, vjp = jax.vjp(lambda *a: causal_attention(*a, impl=impl), q, k, v)
    np.testing.assert_allclose(out, _reference(q, k, v), rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(ct), _vjp_reference(q, k, v, ct)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  def test_splash_kernel_is_reused_across_jits(self):
    """The cached kernel, first built inside one jit (train step), serves another (eval step)."""
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (1, 256, 2, 64)) for key in keys)
    first = jax.jit(lambda *a: causal_attention(*a, impl="splash"))(q, k, v)
    second = jax.jit(lambda *a: 2 * causal_attention(*a, impl="splash"))(q, k, v)
    np.testing.assert_allclose(second, 2 * first, rtol=1e-6)


def _sharded_child():
  """Runs in a subprocess with 4 CPU devices: splash in shard_map (batch over data, heads over
  model), and nested in a stage's shard_map, against splash on one device; prints the largest
  differences."""
  from mhc_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, 128, 4, 64))
  k = jax.random.normal(keys[1], (2, 128, 2, 64))
  v = jax.random.normal(keys[2], (2, 128, 2, 32))
  mesh = sharding.make_mesh(2, 2)
  f = lambda m: jax.jit(lambda *a: causal_attention(*a, impl="splash", mesh=m))(q, k, v)
  # Nested, as in a pipeline stage: inside a shard_map manual over `stage` (2 stages x 2 data).
  staged = sharding.make_mesh(2, 1, stage=2)
  in_stage = jax.shard_map(lambda *a: causal_attention(*a, impl="splash", mesh=staged),
                           mesh=staged, in_specs=P(), out_specs=P(), axis_names={"stage"},
                           check_vma=False)
  one = f(None)
  print(json.dumps([float(np.max(np.abs(f(mesh) - one))),
                    float(np.max(np.abs(jax.jit(in_stage)(q, k, v) - one)))]))


class ShardedAttentionTest(absltest.TestCase):

  def test_splash_in_shard_map_equals_one_device(self):
    flat, nested = helpers.run_with_devices("tests.test_attention:_sharded_child", 4)
    self.assertLess(flat, 1e-5)
    self.assertLess(nested, 1e-5)


if __name__ == "__main__":
  absltest.main()
