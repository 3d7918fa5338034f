"""Mixture of experts: routing, loss-free balancing, dropless dispatch, expert parallelism."""

import functools
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest, parameterized

from mhc_jax.model import decoder, moe
from mhc_jax.model.config import ModelConfig
from mhc_jax.model.decoder import DecoderLM
from mhc_jax.model.layers import SwiGLU
from mhc_jax.training import optim
from mhc_jax.training.steps import create_state, train_step
from tests import helpers

C, E, F = 32, 8, 24


def _cfg(**kw) -> ModelConfig:
  base = dict(vocab_size=64, d_model=C, num_layers=3, num_heads=2, num_experts=E,
              experts_per_token=2, num_shared_experts=1, expert_dim=F, dense_blocks=1,
              connection="mhc", n_streams=2, balance_loss_weight=0.01)
  return ModelConfig(**{**base, **kw})


def _dense_reference(u_TxC, params, cfg):
  """Every expert on every token, weighted by its gate (0 when not selected): no sorting."""
  expert_TxK, gate_TxK, _ = moe.route(u_TxC, params["router"], params["balance_bias"],
                                      cfg.experts_per_token)
  gate_TxE = jnp.zeros((u_TxC.shape[0], cfg.num_experts)).at[
      jnp.arange(u_TxC.shape[0])[:, None], expert_TxK].set(gate_TxK) * cfg.routed_scaling
  h_ExTx2F = jnp.einsum("tc,ecf->etf", u_TxC, params["experts_in"])
  h_ExTxF = nn.silu(h_ExTx2F[..., :F]) * h_ExTx2F[..., F:]
  y_ExTxC = jnp.einsum("etf,efc->etc", h_ExTxF, params["experts_out"])
  routed = jnp.einsum("te,etc->tc", gate_TxE, y_ExTxC)
  gate_up = jnp.einsum("tc,cgf->tgf", u_TxC, params["shared_gate_up"]["kernel"])
  shared = (nn.silu(gate_up[:, 0]) * gate_up[:, 1]) @ params["shared_down"]["kernel"]
  return routed + shared


class MoETest(parameterized.TestCase):

  def _layer(self, cfg, bias_E=None):
    u = jax.random.normal(jax.random.key(1), (2, 16, C))
    layer = moe.MoE(cfg)
    params = nn.meta.unbox(layer.init(jax.random.key(0), u))["params"]
    if bias_E is not None:
      params["balance_bias"] = bias_E
    return layer, params, u

  def test_one_expert_top1_equals_dense_swiglu(self):
    cfg = _cfg(num_experts=1, experts_per_token=1, num_shared_experts=0, expert_dim=F,
               mlp_dim=F)
    layer, params, u = self._layer(cfg)
    y, stats = layer.apply({"params": params}, u)
    dense = SwiGLU(cfg)
    dense_params = {"gate_up": {"kernel": params["experts_in"][0].reshape(C, 2, F)},
                    "down": {"kernel": params["experts_out"][0]}}
    chex.assert_trees_all_close(y, dense.apply({"params": dense_params}, u), atol=1e-5)
    self.assertEqual(float(stats.dropped), 0.0)

  def test_routing_selects_by_affinity_plus_bias_and_weights_by_affinity(self):
    x = jnp.array([[1.0, 0.0]])
    router = jnp.array([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])  # affinities fall with e
    bias = jnp.array([0.0, 0.0, 0.0, 1.0])  # lifts the least-affine expert to the top
    expert, gate, affinity = moe.route(x, router, bias, 2)
    self.assertEqual(sorted(expert[0].tolist()), [0, 3])
    s = jax.nn.sigmoid(jnp.array([2.0, -1.0]))
    np.testing.assert_allclose(np.sort(gate[0]), np.sort(s / s.sum()), rtol=1e-6)
    np.testing.assert_allclose(affinity[0], jax.nn.sigmoid(router[0]), rtol=1e-6)

  @parameterized.named_parameters(("uniform", None, "ragged_dot"),
                                  ("all_to_expert_0", 0, "ragged_dot"),
                                  ("all_to_expert_0_megablox", 0, "megablox"))
  def test_dropless_at_any_load(self, hot_expert, impl):
    cfg = _cfg(moe_impl=impl)
    bias = None
    if hot_expert is not None:  # every token picks expert 0 (and one other)
      bias = jnp.zeros(E).at[hot_expert].set(100.0)
    layer, params, u = self._layer(cfg, bias)
    y, stats = layer.apply({"params": params}, u)
    ref = _dense_reference(u.reshape(-1, C), params, cfg).reshape(u.shape)
    chex.assert_trees_all_close(y, ref, atol=1e-5, rtol=1e-5)
    self.assertEqual(float(stats.load.sum()), u.shape[0] * u.shape[1] * cfg.experts_per_token)
    self.assertEqual(float(stats.dropped), 0.0)
    if hot_expert is not None:
      self.assertEqual(float(stats.load[hot_expert]), u.shape[0] * u.shape[1])

  def test_balance_bias_moves_toward_underloaded_experts(self):
    cfg = _cfg(balance_rate=0.01)
    model = DecoderLM(cfg)
    opt = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=1, schedule="cosine",
                                         min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                                         weight_decay=0.1, grad_clip=1.0))
    tokens = jax.random.randint(jax.random.key(2), (4, 16), 0, cfg.vocab_size)
    state, _ = create_state(model, optim.make_optimizer(opt, 10), jax.random.key(0), tokens)
    _, stats = model.apply({"params": state.params}, tokens, return_moe_stats=True)
    new_state, metrics = jax.jit(train_step)(state, {"inputs": tokens, "targets": tokens})
    load_LxE = np.asarray(stats.load)
    moved = np.asarray(new_state.params["moe_blocks"]["moe"]["balance_bias"]
                       - state.params["moe_blocks"]["moe"]["balance_bias"])
    mean = load_LxE.mean(-1, keepdims=True)
    self.assertTrue(np.all(moved[load_LxE < mean] == np.float32(0.01)))
    self.assertTrue(np.all(moved[load_LxE > mean] == np.float32(-0.01)))
    self.assertTrue((load_LxE < mean).any() and (load_LxE > mean).any())
    self.assertAlmostEqual(float(metrics["moe/load_max_over_mean"]),
                           float(np.max(load_LxE.max(-1) / mean[:, 0])), places=5)
    self.assertEqual(float(metrics["moe/dropped_fraction"]), 0.0)
    self.assertGreater(float(metrics["moe/balance_loss"]), 0.0)

  def test_grad_accumulation_gives_the_same_step(self):
    cfg = _cfg()
    model = DecoderLM(cfg)
    opt = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=1, schedule="cosine",
                                         min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                                         weight_decay=0.1, grad_clip=1.0))
    tokens = jax.random.randint(jax.random.key(3), (8, 16), 0, cfg.vocab_size)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
    state, _ = create_state(model, optim.make_optimizer(opt, 10), jax.random.key(0), tokens)
    whole, m_whole = jax.jit(train_step)(state, batch)
    split, m_split = jax.jit(functools.partial(train_step, grad_accum_steps=4))(state, batch)
    chex.assert_trees_all_close(whole.params, split.params, atol=2e-6)
    chex.assert_trees_all_close(m_whole, m_split, atol=1e-5, rtol=1e-5)
    moved = whole.params["moe_blocks"]["moe"]["balance_bias"]
    np.testing.assert_array_equal(moved, split.params["moe_blocks"]["moe"]["balance_bias"])

  def test_balance_loss_is_one_at_uniform_load(self):
    expert = jnp.array([[[0], [1], [2], [3]]])  # each of 4 experts once, k = 1
    affinity = jnp.ones((1, 4, 4))
    self.assertAlmostEqual(float(moe.sequence_balance_loss(expert, affinity)), 1.0, places=6)

  def test_bias_gets_no_gradient(self):
    cfg = _cfg()
    layer, params, u = self._layer(cfg)
    grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, u)[0] ** 2))(params)
    self.assertEqual(float(jnp.abs(grads["balance_bias"]).max()), 0.0)
    self.assertGreater(float(jnp.abs(grads["router"]).max()), 0.0)

  def test_unscanned_model_equals_scanned(self):
    cfg = _cfg()
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)
    scanned = DecoderLM(cfg)
    params = nn.meta.unbox(scanned.init(jax.random.key(0), tokens))["params"]
    unrolled = {k: v for k, v in params.items() if k not in ("blocks", "moe_blocks")}
    unrolled["blocks_0"] = jax.tree.map(lambda a: a[0], params["blocks"])
    for i in range(cfg.moe_blocks):
      unrolled[f"moe_blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["moe_blocks"])
    out_s, stats_s = scanned.apply({"params": params}, tokens, return_moe_stats=True)
    out_u, stats_u = DecoderLM(ModelConfig(**{**cfg.__dict__, "scan_layers": False})).apply(
        {"params": unrolled}, tokens, return_moe_stats=True)
    chex.assert_trees_all_close(out_s, out_u, atol=1e-5)
    chex.assert_trees_all_close(stats_s, stats_u)
    moved = decoder.apply_balance_update(unrolled, stats_u)
    np.testing.assert_array_equal(
        moved["moe_blocks_1"]["moe"]["balance_bias"],
        unrolled["moe_blocks_1"]["moe"]["balance_bias"] + moe.bias_update(stats_u)[1])


def _child_main(hot: bool):
  """Runs in a subprocess with 8 CPU devices; prints one JSON line of max differences."""
  from mhc_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  cfg = _cfg(num_layers=2)
  model = DecoderLM(cfg)  # no mesh: every expert on one device
  tokens = jax.random.randint(jax.random.key(2), (8, 16), 0, cfg.vocab_size)
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens))["params"]
  if hot:  # every token of every device goes to expert 0: one device gets all the rows
    bias = params["moe_blocks"]["moe"]["balance_bias"]
    params["moe_blocks"]["moe"]["balance_bias"] = bias.at[:, 0].set(100.0)

  def loss(p, model):
    logits, stats = model.apply({"params": p}, tokens, return_moe_stats=True)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + jnp.sum(stats.balance_loss), stats

  step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (ref, ref_stats), ref_grads = step(params, model)
  out = {}
  meshes = [(2, 4, "auto"), (1, 8, "auto"), (8, 1, "auto")]
  if hot:  # the megablox kernels (interpreted) must leave the many spare receive slots at zero
    meshes.append((2, 4, "megablox"))
  for data, expert, impl in meshes:
    mesh = sharding.make_mesh(data, 1, expert=expert)
    parallel = DecoderLM(ModelConfig(**{**cfg.__dict__, "moe_impl": impl}), mesh)
    (val, stats), grads = step(params, parallel)
    hlo = step.lower(params, parallel).compile().as_text()
    out[f"{data}x{expert}-{impl}"] = {
        "loss": abs(float(val - ref)),
        "grads": max(float(jnp.max(jnp.abs(a - b))) for a, b in
                     zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))),
        "load": float(jnp.max(jnp.abs(stats.load - ref_stats.load))),
        "dropped": float(jnp.max(stats.dropped)),
        "all_to_all": "all-to-all" in hlo or expert == 1,  # XLA drops size-1 all-to-alls
    }
  print(json.dumps(out))


class ExpertParallelTest(parameterized.TestCase):

  @parameterized.named_parameters(("uniform", False), ("all_to_expert_0", True))
  def test_expert_parallel_equals_single_device(self, hot):
    results = helpers.run_with_devices("tests.test_moe:_child_main", 8, hot)
    for mesh, r in results.items():
      with self.subTest(mesh=mesh):
        self.assertLess(r["loss"], 1e-5)
        self.assertLess(r["grads"], 1e-5)
        self.assertEqual(r["load"], 0.0)
        self.assertEqual(r["dropped"], 0.0)
        self.assertTrue(r["all_to_all"], "the expert-parallel path was not taken")


if __name__ == "__main__":
  absltest.main()
