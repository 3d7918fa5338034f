"""FSDP on 8 fake CPU devices: the same loss and gradients as one device, state memory / fsdp."""

import json
import os

from absl.testing import absltest
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ((1, 8, 1), (2, 4, 1), (1, 4, 2))  # (data, fsdp, model)


def _child():
  """Runs with 8 CPU devices; prints, per mesh, the largest loss and gradient differences to one
  device and the per-device bytes of the parameters and optimizer state."""
  import jax  # pylint: disable=g-import-not-at-top
  import math  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from mhc_jax.parallel import sharding
  from mhc_jax.training import steps
  from mhc_jax.training import state as run_state

  config = default.get_config("smoke")
  config.batch_size = 8
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (8, 33), np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  def run(mesh):
    state, state_shard = run_state.build_state(config, mesh)
    grad_fn = jax.jit(lambda s, b: steps._loss_and_grads(s.params, s.apply_fn, b),  # pylint: disable=protected-access
                      in_shardings=(state_shard, sharding.batch_sharding(mesh)))
    (loss, _), grads = grad_fn(state, batch)
    state_bytes = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                      for a in jax.tree.leaves((state.params, state.opt_state)))
    return float(loss), grads, state_bytes

  ref_loss, ref_grads, ref_bytes = run(sharding.make_mesh(1, 1, jax.devices()[:1]))
  out = {}
  for data, fsdp, model in MESHES:
    loss, grads, state_bytes = run(sharding.make_mesh(data, model, fsdp=fsdp))
    out[f"{data}x{fsdp}x{model}"] = {
        "loss": abs(loss - ref_loss),
        "grads": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))),
        "state_ratio": state_bytes / ref_bytes}
  print(json.dumps(out))


class FSDPTest(absltest.TestCase):

  def test_meshes_match_one_device_and_shard_the_state(self):
    results = helpers.run_with_devices("tests.test_fsdp:_child", 8)
    for (data, fsdp, model), (name, r) in zip(MESHES, results.items()):
      with self.subTest(mesh=name):
        self.assertLess(r["loss"], 1e-5)
        self.assertLess(r["grads"], 1e-5)
        # Parameters and AdamW moments shard over fsdp (and model). Only small arrays whose
        # model dim is absent (norm scales, gates) stay whole: within 25% of 1 / (fsdp x model).
        ideal = 1 / (fsdp * model)
        self.assertLess(r["state_ratio"], 1.25 * ideal, r)


if __name__ == "__main__":
  absltest.main()
