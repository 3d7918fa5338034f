"""Pipeline parallelism over `stage` on fake CPU devices: the same loss and gradients as one
device, for GPipe and circular schedules, with and without overlapped sends and block
recompute; the bubble fraction; clear errors. (test_elastic.py trains through the pipeline:
a run resumed onto a pipelined mesh.)"""

import json
import os

import pytest

from mhc_jax.parallel import pipeline
from mhc_jax.parallel.pipeline import PipelineConfig
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (stage, data, schedule, repeats, microbatches, overlap_sends, remat_policy, recompute_blocks)
CASES = (
    (4, 1, "gpipe", 1, 4, True, "none", 1),
    (2, 2, "gpipe", 1, 2, False, "none", 1),
    (2, 1, "circular", 2, 4, True, "mhc_block", 2),  # chunks of 2 blocks, one recompute group
    (4, 1, "circular", 2, 4, False, "mhc_block", 1),
)


def _child():
  """Runs with 4 CPU devices; prints per case the loss and gradient differences to 1 device,
  whether the compiled step sends with collective-permute, and the block params' sharding."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from mhc_jax.parallel import sharding
  from mhc_jax.training import steps
  from mhc_jax.training import state as run_state

  tokens = np.random.default_rng(0).integers(0, 256, (8, 33), np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  def config(remat="none", recompute=1):
    c = default.get_config("smoke")
    c.model.num_layers, c.batch_size = 8, 8
    c.model.remat_policy, c.model.recompute_blocks = remat, recompute
    return c

  def run(c, mesh):
    state, state_shard = run_state.build_state(c, mesh)
    grad_fn = jax.jit(lambda s, b: steps._loss_and_grads(s.params, s.apply_fn, b),  # pylint: disable=protected-access
                      in_shardings=(state_shard, sharding.batch_sharding(mesh)))
    (loss, _), grads = grad_fn(state, batch)
    hlo = grad_fn.lower(state, batch).compile().as_text()
    phi = state.params["blocks"]["attn_conn"]["phi"]
    return float(loss), grads, "collective-permute" in hlo, str(phi.sharding.spec)

  out, refs = [], {}
  for stage, data, schedule, repeats, m, overlap, remat, recompute in CASES:
    if (remat, recompute) not in refs:
      refs[remat, recompute] = run(config(remat, recompute),
                                   sharding.make_mesh(1, 1, jax.devices()[:1]))[:2]
    ref_loss, ref_grads = refs[remat, recompute]
    c = config(remat, recompute)
    c.mesh.stage, c.mesh.data = stage, data
    c.pipeline.update(schedule=schedule, repeats=repeats, microbatches=m, overlap_sends=overlap)
    mesh = sharding.mesh_from_config(c.mesh, jax.devices()[:stage * data])
    loss, grads, sends, spec = run(c, mesh)
    out.append({
        "loss": abs(loss - ref_loss),
        "grads": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))),
        "sends": sends, "spec": spec, "summary": run_state.check_pipeline(c, mesh)})
  print(json.dumps(out))


@pytest.fixture(scope="module")
def results():
  return helpers.run_with_devices("tests.test_pipeline:_child", 4)


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=["stage{}-data{}-{}x{}-M{}-overlap{}-{}-Lr{}".format(*c) for c in CASES])
def test_pipeline_matches_one_device(results, case):
  r = results[case]
  assert r["loss"] < 1e-5 and r["grads"] < 1e-5, r
  assert r["sends"], "the compiled step has no collective-permute: the pipeline did not run"
  assert r["spec"].startswith("P('stage',"), r["spec"]  # layers split over stages
  assert "bubble" in r["summary"], r["summary"]


@pytest.mark.parametrize("stages,cfg,expected", [
    (4, PipelineConfig(microbatches=4, overlap_sends=True), 6 / 10),
    (4, PipelineConfig(microbatches=4, overlap_sends=False), 3 / 7),
    (4, PipelineConfig(microbatches=8, schedule="circular", repeats=2, overlap_sends=True), 6 / 22),
    (4, PipelineConfig(microbatches=8, schedule="circular", repeats=2), 3 / 19),
    (1, PipelineConfig(microbatches=8), 0.0),
])
def test_bubble_fraction(stages, cfg, expected):
  assert pipeline.bubble_fraction(stages, cfg) == pytest.approx(expected)


_OK = dict(num_layers=8, moe_blocks=0, scan_layers=True, batch_size=8, batch_ways=1)


@pytest.mark.parametrize("cfg,stages,overrides,message", [
    (PipelineConfig(schedule="1f1b"), 2, {}, "pipeline.schedule='1f1b'"),
    (PipelineConfig(repeats=2), 2, {}, "needs config.pipeline.schedule='circular'"),
    (PipelineConfig(schedule="circular"), 2, {}, "needs config.pipeline.repeats >= 2"),
    (PipelineConfig(microbatches=0), 2, {}, "pipeline.microbatches=0"),
    (PipelineConfig(), 3, {}, "num_layers=8 must split into mesh.stage=3"),
    (PipelineConfig(), 2, {"moe_blocks": 2}, "pipelines dense models only"),
    (PipelineConfig(), 2, {"scan_layers": False}, "needs model.scan_layers=True"),
    (PipelineConfig(microbatches=2, schedule="circular", repeats=2, overlap_sends=True), 2, {},
     "microbatches=2 must be >= 4"),
    (PipelineConfig(microbatches=1, schedule="circular", repeats=2), 2, {},
     "microbatches=1 must be >= 2"),
    (PipelineConfig(microbatches=3), 2, {}, "batch_size=8 must be divisible by pipeline.microbatches=3"),
])
def test_bad_pipeline_config_is_named(cfg, stages, overrides, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("'", "'")):
    pipeline.check_pipeline(cfg, stages, **{**_OK, **overrides})


def test_unknown_pipeline_field_is_named():
  with pytest.raises(ValueError, match="unknown fields \\['stages'\\]"):
    PipelineConfig.from_dict({"stages": 2})

