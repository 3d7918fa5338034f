"""Kernels under `shard_map` on 8 fake CPU devices (a subprocess, so the device count is fresh)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mhc_jax.core import coefficients as xla_coefficients
from mhc_jax.core import streams as xla_streams
from mhc_jax.parallel import kernels as sharded
from tests import helpers

N, C, B, S = 4, 128, 4, 32
KW = dict(num_iters=3, eps=1e-6, post_scale=2.0)  # few iterations: interpret-mode compile time


def _child_main():
  """Runs in the subprocess; prints one JSON line."""
  # Explicit axes: the caller states every sharding; nothing is left to the partitioner.
  mesh = jax.make_mesh((4, 2), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
  ks = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(ks[0], (B, S, N, C))
  y = jax.random.normal(ks[1], (B, S, C))
  phi = jax.random.normal(ks[2], (N * C, N * N + 2 * N)) / np.sqrt(N * C)
  alpha = jnp.array([1.0, 1.0, 1.0])
  bias = 0.1 * jax.random.normal(ks[3], (N * N + 2 * N,))
  tok = NamedSharding(mesh, P("data", "seq"))
  xs, ys = jax.device_put(x, tok), jax.device_put(y, tok)
  axes = dict(impl="pallas", mesh=mesh, batch_axis="data", seq_axis="seq")

  def layer(x, y, phi, alpha, bias):
    h_pre, h_post, h_res = sharded.mhc_coefficients(x, phi, alpha, bias, **axes, **KW)
    u = sharded.pre_mix(x, h_pre, **axes)
    return sharded.post_res_mix(x, y + u, h_post, h_res, **axes)

  def ref_layer(x, y, phi, alpha, bias):
    h_pre, h_post, h_res = xla_coefficients.mhc_coefficients(x, phi, alpha, bias, **KW)
    return xla_streams.post_res_mix(x, y + xla_streams.pre_mix(x, h_pre), h_post, h_res)

  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  step = jax.jit(jax.value_and_grad(loss(layer), argnums=(0, 2, 3, 4)))
  hlo = step.lower(xs, ys, phi, alpha, bias).compile().as_text()
  (val, grads) = step(xs, ys, phi, alpha, bias)
  out = jax.jit(layer)(xs, ys, phi, alpha, bias)
  ref_out = ref_layer(x, y, phi, alpha, bias)
  ref_val, ref_grads = jax.value_and_grad(loss(ref_layer), argnums=(0, 2, 3, 4))(
      x, y, phi, alpha, bias)
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
  print(json.dumps(dict(
      all_gather=hlo.count("all-gather"), all_reduce=hlo.count("all-reduce"),
      out_sharding=str(out.sharding.spec), out_rel=rel(out, ref_out), val_rel=rel(val, ref_val),
      grad_rel=[rel(g, r) for g, r in zip(grads, ref_grads)])))



class ShardedTest(absltest.TestCase):

  def test_sharded_layer_matches_reference_without_all_gather(self):
    res = helpers.run_with_devices("tests.test_kernels_sharded:_child_main", 8)
    self.assertEqual(res["all_gather"], 0)  # activations stay sharded; phi is replicated
    self.assertEqual(res["out_sharding"], "P('data', 'seq', None, None)")
    self.assertLess(res["out_rel"], 2e-6)
    self.assertLess(res["val_rel"], 1e-5)
    for rel in res["grad_rel"]:  # x, phi (all-reduced over the mesh), alpha, bias
      self.assertLess(rel, 1e-5)


if __name__ == "__main__":
  absltest.main()
