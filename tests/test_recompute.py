"""The paper's block recompute in groups of `recompute_blocks` blocks (mhc_jax/recompute.py)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.model.config import ModelConfig
from mhc_jax.model.decoder import DecoderLM
from mhc_jax.model.recompute import optimal_group

# 5 blocks: groups of 2 leave a last group of 1, groups of 3 one of 2.
DENSE = ModelConfig(vocab_size=64, d_model=32, num_layers=5, num_heads=4, n_streams=4,
                    sinkhorn_iters=4)  # few iterations: compile time, not the point here
# 1 dense block + 3 MoE blocks: two stacks, grouped separately.
MOE = dataclasses.replace(DENSE, num_layers=4, num_experts=4, experts_per_token=2,
                          num_shared_experts=1, expert_dim=32, dense_blocks=1)


def _tokens(s=13):
  return jax.random.randint(jax.random.key(1), (2, s), 0, DENSE.vocab_size)


def _init(cfg, tokens):
  init = jax.jit(lambda t: DecoderLM(cfg).init(jax.random.key(0), t)["params"])
  return nn.meta.unbox(init(tokens))


def _apply(cfg, params, tokens, **kw):
  return jax.jit(lambda p, t: DecoderLM(cfg).apply({"params": p}, t, **kw))(params, tokens)


def _loss(cfg, params, tokens):
  logits = DecoderLM(cfg).apply({"params": params}, tokens[:, :-1])
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))


@pytest.mark.parametrize("base,group", [(DENSE, 3), (MOE, 2)], ids=["dense-3+2", "moe-1;2+1"])
def test_grouped_recompute_matches_no_remat(base, group):
  tokens = _tokens()
  params = _init(base, tokens)
  grouped = dataclasses.replace(base, remat_policy="mhc_block", recompute_blocks=group)
  la, ga = jax.jit(jax.value_and_grad(lambda p: _loss(base, p, tokens)))(params)
  lb, gb = jax.jit(jax.value_and_grad(lambda p: _loss(grouped, p, tokens)))(params)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), ga, gb)


def test_params_and_per_layer_outputs_do_not_depend_on_the_group():
  """Same init, same checkpoint layout, and the per-layer outputs in layer order."""
  tokens = _tokens()
  params = _init(DENSE, tokens)
  grouped = dataclasses.replace(DENSE, remat_policy="mhc_block", recompute_blocks=2)
  jax.tree.map(np.testing.assert_array_equal, params, _init(grouped, tokens))
  _, ca = _apply(DENSE, params, tokens, return_coeffs=True)
  _, cb = _apply(grouped, params, tokens, return_coeffs=True)
  assert cb.h_res.shape[0] == 2 * DENSE.num_layers
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ca, cb)
  moe_params = _init(MOE, tokens)
  _, sa = _apply(MOE, moe_params, tokens, return_moe_stats=True)
  moe_grouped = dataclasses.replace(MOE, remat_policy="mhc_block", recompute_blocks=2)
  _, sb = _apply(moe_grouped, moe_params, tokens, return_moe_stats=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), sa, sb)


def _temp_bytes(group: int) -> int:
  cfg = dataclasses.replace(DENSE, d_model=64, num_layers=8, remat_policy="mhc_block",
                            recompute_blocks=group)
  tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32)
  params = jax.eval_shape(lambda: _init(cfg, jnp.zeros(tokens.shape, tokens.dtype)))
  grad = jax.jit(jax.grad(lambda p, t: _loss(cfg, p, t)))
  return grad.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def test_groups_keep_fewer_streams_than_per_block_recompute():
  """The compiled backward keeps one stream state per group, not per block.

  Between group sizes 2 and 4 of 8 blocks the kept group inputs fall by 2 states of
  n C per token while the group being rebuilt grows by 2 blocks' worth.
  """
  per_block, by_two, by_four = (_temp_bytes(g) for g in (1, 2, 4))
  stream_state = 4 * 64 * 4 * 256 * 4  # n C values per token x tokens x float32
  assert by_two < per_block - 4 * stream_state
  assert by_four > by_two  # the group being rebuilt outweighs the two saved inputs


def test_optimal_group_follows_the_paper():
  # L_r* = sqrt(n L_sub / (n + 2)) sublayers with L_sub = 2 L, counted here in blocks.
  assert optimal_group(4, 12) == 2  # the 3B shape: sqrt(48 / 12) = 2
  assert optimal_group(4, 30) == 3  # the 27B shape: sqrt(120 / 12) = 3.16
  assert optimal_group(4, 1) == 1 and optimal_group(8, 2) == 1
  assert dataclasses.replace(DENSE, remat_policy="mhc_block", recompute_blocks=0)  # valid


@pytest.mark.parametrize("kw", [dict(recompute_blocks=-1),
                                dict(recompute_blocks=2),  # with remat_policy="none"
                                dict(recompute_blocks=2, remat_policy="mhc_block",
                                     scan_layers=False)])
def test_config_errors_name_recompute_blocks(kw):
  with pytest.raises(ValueError, match="model.recompute_blocks="):
    dataclasses.replace(DENSE, **kw)
