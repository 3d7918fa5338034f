"""The LM with `mhc_impl="pallas"` (interpret mode on CPU) vs `mhc_impl="xla"`: training parity,
bf16 forward parity and the fallback of `resolve_impl`."""

import logging

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mhc_jax.model.config import ModelConfig
from mhc_jax.model.decoder import DecoderLM, resolve_impl
from mhc_jax.training import optim, steps

# d_model=128 is the smallest width the kernels take (a multiple of 128 lanes).
SMALL = dict(vocab_size=64, d_model=128, num_layers=2, num_heads=2, n_streams=4)
BATCH, SEQ = 2, 16
NUM_STEPS = 3
F32_EPS = float(jnp.finfo(jnp.float32).eps)
BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)  # 2**-7


def _cfg(**kw):
  return ModelConfig(**{**SMALL, **kw})


def _batch(seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (BATCH, SEQ + 1), 0, SMALL["vocab_size"])
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


OPT = ml_collections.ConfigDict(dict(
    lr=3e-3, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
    weight_decay=0.1, grad_clip=1.0))


def _create_state(cfg, batch):
  tx = optim.make_optimizer(OPT, total_steps=NUM_STEPS)
  return jax.jit(lambda rng: steps.create_state(DecoderLM(cfg), tx, rng, batch["inputs"])[0])(
      jax.random.key(1))


def _first_step_grads(state, metrics):
  """Step 1's gradients read back from AdamW's first moment, `mu = (1 - b1) * clip(g)`.

  Saves compiling a separate gradient function for each impl (the bulk of this file's runtime).
  """
  chex.assert_equal(int(state.step), 1)
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")
  scale = (1 - OPT.b1) * min(1.0, OPT.grad_clip / float(metrics["grad_norm"]))
  return jax.tree.map(lambda m: m / scale, mu)


def _max_abs(tree):
  return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


def _off_symmetric_init(params):
  """Random mHC biases and alpha=0.5, so that parity means something.

  At init the streams are replicas and H_post ~ 1, so H_res and its transpose (any doubly
  stochastic matrix) map them alike, and dL/dH_res = g x^T varies along rows only, which
  Sinkhorn's backward sends to ~0: a transposed or ignored H_res would pass unseen.
  """
  blocks = dict(params["blocks"])
  for i, conn in enumerate(("attn_conn", "mlp_conn")):
    bias = blocks[conn]["bias"]
    blocks[conn] = {**blocks[conn], "alpha": jnp.full_like(blocks[conn]["alpha"], 0.5),
                    "bias": bias + jax.random.normal(jax.random.key(10 + i), bias.shape)}
  return {**params, "blocks": blocks}


@pytest.fixture(scope="module")
def init_states():
  batch = _batch()
  return _create_state(_cfg(), batch), _create_state(_cfg(mhc_impl="pallas"), batch), batch


@pytest.fixture
def states(init_states):
  xla, pallas, batch = init_states
  params = _off_symmetric_init(xla.params)
  return xla.replace(params=params), pallas.replace(params=params), batch


def test_same_params_at_init(init_states):
  xla, pallas, _ = init_states
  chex.assert_trees_all_equal_structs(xla.params, pallas.params)
  chex.assert_trees_all_equal_shapes_and_dtypes(xla.params, pallas.params)
  chex.assert_trees_all_equal(xla.params, pallas.params)


def test_train_steps_match_xla(states):
  xla, pallas, batch = states
  step = jax.jit(steps.train_step)
  for i in range(NUM_STEPS):
    xla, m_xla = step(xla, batch)
    pallas, m_pallas = step(pallas, batch)
    np.testing.assert_allclose(m_pallas["train_loss"], m_xla["train_loss"], rtol=1e-5,
                               err_msg=f"loss at step {i}")
    np.testing.assert_allclose(m_pallas["grad_norm"], m_xla["grad_norm"], rtol=1e-5,
                               err_msg=f"grad norm at step {i}")
    if i == 0:
      g_xla, g_pallas = _first_step_grads(xla, m_xla), _first_step_grads(pallas, m_pallas)
      chex.assert_trees_all_equal_shapes_and_dtypes(g_xla, g_pallas)
      # A leaf's error is float32 rounding of the activation gradients it sums, so the floor
      # scales with the largest gradient, not with the leaf's own (the exit gate's gradients are
      # 1e-3 of the largest and come from cancellation). Measured: 2.4 eps of max|g|.
      atol = 16 * F32_EPS * _max_abs(g_xla)
      for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(g_xla),
                                   jax.tree.leaves(g_pallas)):
        np.testing.assert_allclose(got, want, rtol=64 * F32_EPS, atol=atol,
                                   err_msg=f"step-1 gradient {jax.tree_util.keystr(path)}")
  assert float(m_xla["train_loss"]) < 0.5 * np.log(SMALL["vocab_size"])  # it trained


def test_bf16_forward_matches_xla(states):
  xla, _, batch = states
  variables = {"params": xla.params}
  want = jax.jit(DecoderLM(_cfg(dtype="bfloat16")).apply)(variables, batch["inputs"])
  got = jax.jit(DecoderLM(_cfg(dtype="bfloat16", mhc_impl="pallas")).apply)(
      variables, batch["inputs"])
  chex.assert_equal(got.dtype, jnp.float32)  # logits come back in float32
  # Both paths round each mix to bf16 once after a float32 sum, but a different summation order
  # can flip a rounding, which later layers carry on: about one bf16 ulp (0.8 eps measured, rms
  # and max), where a transposed H_res gives 2 eps rms.
  rms = lambda a: float(jnp.sqrt(jnp.mean(jnp.square(a))))
  assert rms(got - want) <= 1.5 * BF16_EPS * rms(want)
  np.testing.assert_allclose(got, want, rtol=0, atol=4 * BF16_EPS * _max_abs(want))


def test_resolve_impl_pallas_for_supported_width(caplog):
  with caplog.at_level(logging.WARNING):
    assert resolve_impl(_cfg(mhc_impl="pallas")) == "pallas"
  assert not caplog.records


def test_resolve_impl_falls_back_for_unsupported_width(caplog):
  cfg = _cfg(mhc_impl="pallas", d_model=96)
  with caplog.at_level(logging.WARNING):
    assert resolve_impl(cfg) == "xla"
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert "pallas" in warnings[0].getMessage() and "C=96" in warnings[0].getMessage()
  # The model takes the fallback too: the kernels would raise on C=96 while tracing.
  jax.eval_shape(DecoderLM(cfg).init, jax.random.key(0), _batch()["inputs"])


@pytest.mark.parametrize("connection,n", [("hc", 4), ("residual", 1)])
@pytest.mark.parametrize("d_model", [96, 128])
def test_resolve_impl_xla_for_other_connections(caplog, connection, n, d_model):
  cfg = _cfg(mhc_impl="pallas", connection=connection, n_streams=n, d_model=d_model)
  with caplog.at_level(logging.WARNING):
    assert resolve_impl(cfg) == "xla"
  assert not caplog.records  # nothing to warn about: the kernels are mHC-only


def test_resolve_impl_xla_when_asked():
  assert resolve_impl(_cfg()) == "xla"
  assert resolve_impl(_cfg(d_model=96)) == "xla"
