"""Multi-head latent attention (DeepSeek-V2/V3): low-rank queries and keys/values, decoupled RoPE.

  c_q  = RMSNorm(x W_dq)                    (q_lora_rank; without it, c_q = x)
  q    = [c_q W_uq ; RoPE(c_q W_qr)]        per head: qk_nope_dim + qk_rope_dim
  c_kv = RMSNorm(x W_dkv)                   (kv_lora_rank)
  k    = [c_kv W_uk ; RoPE(x W_kr)]         the RoPE part is one head shared by all heads
  v    = c_kv W_uv                          per head: v_head_dim
  out  = softmax(q k^T / sqrt(qk_nope_dim + qk_rope_dim), causal) v W_o

Attention runs by `model.attention_impl` (attention.py): with `auto`, TPU's splash kernel (values
zero-padded to the query width), GPU's cuDNN flash attention (values padded to the query width), else
XLA with the scores materialised.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mhc_jax.model.attention import causal_attention
from mhc_jax.model.config import ModelConfig
from mhc_jax.model.layers import RMSNorm, apply_rope, dense_init
from mhc_jax.parallel import platform


class MLA(nn.Module):
  """Causal multi-head latent attention; `__call__(x (B, S, C), sin, cos) -> (B, S, C)`.

  `mesh`: the run's mesh, for the attention kernels' `shard_map` (attention.py).
  """
  cfg: ModelConfig
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, x_BxSxC: jax.Array, sin_SxR: jax.Array, cos_SxR: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt, c, h = cfg.activation_dtype, cfg.d_model, cfg.num_heads
    nope, rope, dv = cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_head_dim

    def dense(features, fan_in, names, name, axis=-1):
      return nn.DenseGeneral(features, axis=axis, use_bias=False, dtype=dt, name=name,
                             kernel_init=dense_init(fan_in, names))

    c_q = x_BxSxC
    if cfg.q_lora_rank:
      c_q = dense(cfg.q_lora_rank, c, ("embed", None), "q_down")(x_BxSxC)
      c_q = RMSNorm(cfg.norm_eps, dt, name="q_norm")(c_q)
    q_BxSxNxD = dense((h, nope + rope), c_q.shape[-1], (None, "heads", "kv"), "q_up")(c_q)
    q_nope, q_rope = q_BxSxNxD[..., :nope], q_BxSxNxD[..., nope:]

    kv_BxSxL = dense(cfg.kv_lora_rank + rope, c, ("embed", None), "kv_down")(x_BxSxC)
    c_kv = RMSNorm(cfg.norm_eps, dt, name="kv_norm")(kv_BxSxL[..., :cfg.kv_lora_rank])
    k_rope_BxSx1xR = apply_rope(kv_BxSxL[..., None, cfg.kv_lora_rank:], sin_SxR, cos_SxR)
    kv_BxSxNxE = dense((h, nope + dv), cfg.kv_lora_rank, (None, "heads", "kv"), "kv_up")(c_kv)
    k_nope, v_BxSxNxV = kv_BxSxNxE[..., :nope], kv_BxSxNxE[..., nope:]

    q = jnp.concatenate([q_nope, apply_rope(q_rope, sin_SxR, cos_SxR)], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope_BxSx1xR, k_nope.shape[:-1] + (rope,))],
                        axis=-1)
    # Init sees a one-row example batch; the parameters do not depend on the kernel.
    impl = ("xla" if self.is_initializing() else
            platform.attention_impl(cfg.attention_impl, seq_len=x_BxSxC.shape[1], dtype=dt,
                                    mesh=self.mesh))
    out_BxSxNxV = causal_attention(q, k, v_BxSxNxV, impl=impl, mesh=self.mesh)
    return dense(c, h * dv, ("heads", "kv", "embed"), "out", axis=(-2, -1))(out_BxSxNxV)
