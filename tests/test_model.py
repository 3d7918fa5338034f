"""The decoder LM with residual / HC / mHC connections: shapes, causality, equivalences."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.model.config import ModelConfig
from mhc_jax.model.decoder import DecoderLM

TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2)


def _cfg(**kw):
  return ModelConfig(**{**TINY, **kw})


def _tokens(b=2, s=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, s), 0, TINY["vocab_size"])


def _init(cfg, tokens):
  return nn.meta.unbox(DecoderLM(cfg).init(jax.random.key(0), tokens)["params"])


def _loss(cfg, params, tokens):
  logits = DecoderLM(cfg).apply({"params": params}, tokens[:, :-1])
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))


@pytest.mark.parametrize("connection,n", [("residual", 1), ("hc", 2), ("hc", 4), ("mhc", 1),
                                          ("mhc", 2), ("mhc", 4), ("mhc", 8), ("mhc_lite", 1),
                                          ("mhc_lite", 3), ("mhc_lite", 4)])
def test_shapes_and_coefficients(connection, n):
  cfg, tokens = _cfg(connection=connection, n_streams=n), _tokens()
  params = _init(cfg, tokens)
  logits, coeffs = DecoderLM(cfg).apply({"params": params}, tokens, return_coeffs=True)
  assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
  layers = 2 * cfg.num_layers
  assert coeffs.h_pre.shape == (layers, 2, 12, n)
  assert coeffs.h_post.shape == (layers, 2, 12, n)
  assert coeffs.h_res.shape == (layers, 2, 12, n, n)
  assert bool(jnp.all(jnp.isfinite(logits)))
  if connection.startswith("mhc"):  # math.md §3 init: H_post = 2 sigmoid(~0) ~ 1, H_res ~ 1/n
    np.testing.assert_allclose(coeffs.h_post, 1.0, atol=0.05)
    np.testing.assert_allclose(coeffs.h_res, 1.0 / n, atol=0.05)
    np.testing.assert_allclose(jnp.sum(coeffs.h_res, -1), 1.0, atol=2e-6)


@pytest.mark.parametrize("connection,n", [("residual", 1), ("hc", 4), ("mhc", 4),
                                          ("mhc_lite", 4)])
def test_causal(connection, n):
  cfg, tokens = _cfg(connection=connection, n_streams=n), _tokens()
  params = _init(cfg, tokens)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 64)
  a = DecoderLM(cfg).apply({"params": params}, tokens)
  b = DecoderLM(cfg).apply({"params": params}, changed)
  np.testing.assert_array_equal(a[:, :7], b[:, :7])
  assert float(jnp.max(jnp.abs(a[:, 7:] - b[:, 7:]))) > 1e-4


def test_hc_at_init_equals_residual_network():
  tokens = _tokens()
  res_cfg, hc_cfg = _cfg(connection="residual", n_streams=1), _cfg(connection="hc", n_streams=4)
  res_params = _init(res_cfg, tokens)
  hc_params = _init(hc_cfg, tokens)
  # Same sublayer weights; the HC connection parameters stay at their init.
  hc_params = {**hc_params, **{k: v for k, v in res_params.items() if k != "blocks"}}
  hc_params["blocks"] = {**hc_params["blocks"], **res_params["blocks"]}
  a = DecoderLM(res_cfg).apply({"params": res_params}, tokens)
  b = DecoderLM(hc_cfg).apply({"params": hc_params}, tokens)
  np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
  static_pre = hc_params["blocks"]["attn_conn"]["static_pre"]  # layer 2k: one-hot on 2k mod n
  np.testing.assert_array_equal(static_pre, [[1, 0, 0, 0], [0, 0, 1, 0]])


def test_mhc_res_mixing_is_applied():
  # Guards against "H_res computed but never applied": its bias must change the output. At init
  # the replicated streams stay (nearly) equal and any row-stochastic H_res maps them to
  # themselves; and with a uniform H_pre the next sublayer sees the stream sum, which a doubly
  # stochastic H_res preserves. So H_post and H_pre first get per-stream biases.
  cfg, tokens = _cfg(connection="mhc", n_streams=4), _tokens()
  params = _init(cfg, tokens)
  for conn in ("attn_conn", "mlp_conn"):
    bias = params["blocks"][conn]["bias"]
    params["blocks"][conn]["bias"] = bias.at[:, :8].set(jnp.array([3.0, -3.0, 1.0, -1.0] * 2))
  out = DecoderLM(cfg).apply({"params": params}, tokens)
  moved = jax.tree.map(lambda x: x, params)
  bias = moved["blocks"]["mlp_conn"]["bias"]
  moved["blocks"]["mlp_conn"]["bias"] = bias.at[:, 8:].set(8.0 * jnp.eye(4).reshape(-1))
  assert float(jnp.max(jnp.abs(DecoderLM(cfg).apply({"params": moved}, tokens) - out))) > 1e-2


def _restack(scanned_blocks, num_layers):
  return {f"blocks_{i}": jax.tree.map(lambda x: x[i], scanned_blocks) for i in range(num_layers)}


@pytest.mark.parametrize("connection,n", [("hc", 4), ("mhc", 4)])
def test_scan_equals_unrolled(connection, n):
  cfg, tokens = _cfg(connection=connection, n_streams=n), _tokens(s=13)
  params = _init(cfg, tokens)
  unrolled = {k: v for k, v in params.items() if k != "blocks"}
  unrolled.update(_restack(params["blocks"], cfg.num_layers))
  ucfg = dataclasses.replace(cfg, scan_layers=False)
  la, ga = jax.value_and_grad(lambda p: _loss(cfg, p, tokens))(params)
  lb, gb = jax.value_and_grad(lambda p: _loss(ucfg, p, tokens))(unrolled)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  gb_blocks = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[gb[f"blocks_{i}"] for i in range(cfg.num_layers)])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               ga["blocks"], gb_blocks)


@pytest.mark.parametrize("policy", ["full", "dots", "mhc_block"])
def test_remat_matches_no_remat(policy):
  cfg, tokens = _cfg(connection="mhc", n_streams=4), _tokens(s=13)
  params = _init(cfg, tokens)
  rcfg = dataclasses.replace(cfg, remat_policy=policy)
  la, ga = jax.value_and_grad(lambda p: _loss(cfg, p, tokens))(params)
  lb, gb = jax.value_and_grad(lambda p: _loss(rcfg, p, tokens))(params)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), ga, gb)


@pytest.mark.parametrize("connection", ["mhc", "mhc_lite"])
@pytest.mark.parametrize("kw", [dict(mhc_dynamic=False), dict(mhc_exit="sum"),
                                dict(mhc_exit="mean"), dict(dtype="bfloat16"),
                                dict(mhc_res_identity_bias=4.0)])
def test_mhc_options_run(kw, connection):
  cfg, tokens = _cfg(connection=connection, n_streams=4, **kw), _tokens()
  params = _init(cfg, tokens)
  logits, coeffs = DecoderLM(cfg).apply({"params": params}, tokens, return_coeffs=True)
  assert bool(jnp.all(jnp.isfinite(logits))) and coeffs.h_res.dtype == jnp.float32
  if "mhc_res_identity_bias" in kw:  # b_res = tau I biases H_res toward the identity
    assert float(jnp.min(jnp.diagonal(coeffs.h_res, axis1=-2, axis2=-1))) > 0.5


@pytest.mark.parametrize("kw,field", [
    (dict(n_streams=0), "n_streams"), (dict(d_model=30, num_heads=4), "d_model"),
    (dict(num_kv_heads=3), "num_kv_heads"), (dict(connection="dense"), "connection"),
    (dict(connection="residual", n_streams=4), "n_streams"), (dict(sinkhorn_iters=0),
                                                              "sinkhorn_iters"),
    (dict(remat_policy="some"), "remat_policy"), (dict(dtype="float16"), "dtype"),
])
def test_config_errors_name_the_field(kw, field):
  with pytest.raises(ValueError, match=f"model.{field}="):
    _cfg(**kw)


def test_unknown_config_field_is_named():
  with pytest.raises(ValueError, match="unknown fields.*n_stream"):
    ModelConfig.from_dict({"n_stream": 4})
