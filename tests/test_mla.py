"""Multi-head latent attention: causal, and equal to a plain per-head reference of its formula."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from mhc_jax.model.config import ModelConfig
from mhc_jax.model.layers import rope_tables
from mhc_jax.model.mla import MLA

B, S, C = 2, 12, 48


def _cfg(q_lora_rank: int) -> ModelConfig:
  return ModelConfig(d_model=C, num_heads=3, attention="mla", q_lora_rank=q_lora_rank,
                     kv_lora_rank=16, qk_nope_dim=8, qk_rope_dim=4, v_head_dim=6)


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _rope(x_SxD, pos_S, theta=10_000.0):
  """Rotates the pairs (x[i], x[i + D/2]) by pos * theta^(-2i/D)."""
  d = x_SxD.shape[-1]
  ang = pos_S[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]
  x1, x2 = x_SxD[:, :d // 2], x_SxD[:, d // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)],
                        -1)


def _reference(x_SxC, p, cfg):
  """The MLA formula for one sequence, head by head, in float64 numpy."""
  x = np.asarray(x_SxC, np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  nope, rope, lora = cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.kv_lora_rank
  pos = np.arange(x.shape[0], dtype=np.float64)
  c_q = x
  if cfg.q_lora_rank:
    c_q = _rms(x @ p["q_down"]["kernel"], p["q_norm"]["scale"], cfg.norm_eps)
  kv = x @ p["kv_down"]["kernel"]
  c_kv = _rms(kv[:, :lora], p["kv_norm"]["scale"], cfg.norm_eps)
  k_rope = _rope(kv[:, lora:], pos)  # one RoPE key for all heads
  heads = []
  for h in range(cfg.num_heads):
    q = c_q @ p["q_up"]["kernel"][:, h]
    q = np.concatenate([q[:, :nope], _rope(q[:, nope:], pos)], -1)
    kv_h = c_kv @ p["kv_up"]["kernel"][:, h]
    k = np.concatenate([kv_h[:, :nope], k_rope], -1)
    v = kv_h[:, nope:]
    scores = q @ k.T / np.sqrt(nope + rope)
    scores = np.where(np.tril(np.ones_like(scores, bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    heads.append(probs / probs.sum(-1, keepdims=True) @ v)
  out = np.stack(heads, 1)  # (S, H, V)
  return np.einsum("shv,hvc->sc", out, p["out"]["kernel"])


class MLATest(parameterized.TestCase):

  def _init(self, cfg):
    x = jax.random.normal(jax.random.key(0), (B, S, C))
    sin, cos = rope_tables(S, cfg.rope_dim, cfg.rope_theta)
    mla = MLA(cfg)
    params = nn.meta.unbox(mla.init(jax.random.key(1), x, sin, cos))["params"]
    # Non-trivial norm scales, so that a missing norm cannot pass.
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 1.5 if path[-1].key == "scale" else a, params)
    return mla, params, x, sin, cos

  @parameterized.named_parameters(("q_full_rank", 0), ("q_low_rank", 10))
  def test_equals_reference_formula(self, q_lora_rank):
    cfg = _cfg(q_lora_rank)
    mla, params, x, sin, cos = self._init(cfg)
    self.assertEqual("q_down" in params, bool(q_lora_rank))
    out = mla.apply({"params": params}, x, sin, cos)
    for b in range(B):
      np.testing.assert_allclose(out[b], _reference(x[b], params, cfg), rtol=2e-4, atol=2e-5)

  def test_causal(self):
    cfg = _cfg(10)
    mla, params, x, sin, cos = self._init(cfg)
    t = S // 2
    changed = x.at[:, t + 1:].set(jax.random.normal(jax.random.key(5), (B, S - t - 1, C)))
    a = mla.apply({"params": params}, x, sin, cos)
    b = mla.apply({"params": params}, changed, sin, cos)
    chex.assert_trees_all_close(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
    self.assertGreater(float(jnp.abs(a[:, t + 1:] - b[:, t + 1:]).max()), 1e-3)


if __name__ == "__main__":
  absltest.main()
