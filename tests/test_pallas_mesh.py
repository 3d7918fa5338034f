"""`mhc_impl="pallas"` under a mesh (8 fake CPU devices, interpret mode): the kernels run per
device through `shard_map`, and the loss and gradients equal the XLA path's on the same mesh.
Inside pipeline stages (`stage 2 x data 2 x model 2`) their `shard_map` nests in the pipeline's,
and the loss and gradients still equal the XLA path's."""

import json
import os

from absl.testing import absltest
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = dict(data=2, fsdp=2, model=2)
STAGED_MESH = dict(stage=2, data=2, model=2)


def _child():
  """Runs with 8 CPU devices; prints both implementations' losses, their largest gradient
  difference (relative to the largest gradient), the kernel calls and the mesh's backend."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from mhc_jax.parallel import platform  # pylint: disable=g-import-not-at-top
  from mhc_jax.parallel import sharding
  from mhc_jax.training import steps
  from mhc_jax.training import state as run_state

  config = default.get_config("smoke")
  config.batch_size, config.seq_len = 8, 16
  config.model.update(connection="mhc", d_model=128, sinkhorn_iters=4)  # 128: smallest kernel C
  config.pipeline.microbatches = 2  # used on the staged mesh only
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (8, 17), np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  meshes = {"flat": sharding.make_mesh(MESH["data"], MESH["model"], fsdp=MESH["fsdp"]),
            "staged": sharding.make_mesh(STAGED_MESH["data"], STAGED_MESH["model"],
                                         stage=STAGED_MESH["stage"])}

  def off_symmetric(params):
    """Random connection biases: at init the streams are replicas and the mixing is symmetric,
    which would hide a transposed or misplaced coefficient."""
    keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(params))))
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.5 * jax.random.normal(next(keys), p.shape, p.dtype)
        if "conn" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path) else p,
        params)

  def loss_and_grads(impl, mesh_name="flat"):
    config.model.mhc_impl, mesh = impl, meshes[mesh_name]
    state, state_shard = run_state.build_state(config, mesh)
    state = state.replace(params=off_symmetric(state.params))
    fn = lambda s, b: steps._loss_and_grads(s.params, s.apply_fn, b)  # pylint: disable=protected-access
    calls = str(jax.make_jaxpr(fn)(state, batch)).count("mhc_post_res_mix")
    (loss, _), grads = jax.jit(fn, in_shardings=(state_shard, sharding.batch_sharding(mesh)))(
        state, batch)
    return float(loss), grads, calls

  loss_xla, g_xla, _ = loss_and_grads("xla")
  g_max = max(float(np.max(np.abs(np.asarray(g)))) for g in jax.tree.leaves(g_xla))
  out = {"backend": platform.kernel_block_sizes(meshes["flat"]).backend}
  for mesh_name in meshes:
    loss, grads, kernel_calls = loss_and_grads("pallas", mesh_name)
    g_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree.leaves(g_xla), jax.tree.leaves(grads)))
    out[mesh_name] = dict(loss=[loss_xla, loss], grad_rel=g_diff / g_max,
                          kernel_calls=kernel_calls)
  print(json.dumps(out))


class PallasMeshTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.results = helpers.run_with_devices("tests.test_pallas_mesh:_child", 8)

  def _check_matches_xla(self, r):
    self.assertGreater(r["kernel_calls"], 0)  # the pallas step really runs the kernels
    self.assertLess(abs(r["loss"][1] - r["loss"][0]), 1e-5 * r["loss"][0])
    # float32 rounding of sums in another order (test_model_pallas measures 2.4 eps of max|g|).
    self.assertLess(r["grad_rel"], 1e-5)

  def test_pallas_loss_and_grads_match_xla_on_a_mesh(self):
    self.assertEqual(self.results["backend"], "interpret")  # follows the mesh's (CPU) devices
    self._check_matches_xla(self.results["flat"])

  def test_pallas_in_pipeline_stages_matches_xla(self):
    self._check_matches_xla(self.results["staged"])


if __name__ == "__main__":
  absltest.main()
