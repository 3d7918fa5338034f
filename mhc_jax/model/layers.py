"""Transformer sublayers: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP.

Params are float32 and carry logical axis names (see `sharding.py`); compute runs in the
activation dtype given by the config.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mhc_jax.model.attention import causal_attention
from mhc_jax.model.config import ModelConfig
from mhc_jax.parallel import platform


def dense_init(fan_in: int, names: tuple[str | None, ...], scale: float = 1.0):
  """Truncated-normal init with std `scale / sqrt(fan_in)`, tagged with logical axis names."""
  std = scale / fan_in**0.5
  return nn.with_logical_partitioning(nn.initializers.truncated_normal(std), names)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learned scale; statistics in float32."""
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_xC: jax.Array) -> jax.Array:
    scale_C = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                         (x_xC.shape[-1],))
    x = x_xC.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * scale_C).astype(self.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """`(sin, cos)` tables of shape `(S, head_dim // 2)` for positions `0..S-1`."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles_SxH = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.sin(angles_SxH), jnp.cos(angles_SxH)


def apply_rope(x_BxSxNxH: jax.Array, sin_SxH: jax.Array, cos_SxH: jax.Array) -> jax.Array:
  """Rotates pairs `(x[:H/2], x[H/2:])` of every head by position-dependent angles."""
  x1, x2 = jnp.split(x_BxSxNxH.astype(jnp.float32), 2, axis=-1)
  sin, cos = sin_SxH[:, None, :], cos_SxH[:, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxSxNxH.dtype)


class Attention(nn.Module):
  """Causal grouped-query self-attention with RoPE, by `cfg.attention_impl` (attention.py);
  `mesh`: the run's mesh, for the attention kernels' `shard_map`."""
  cfg: ModelConfig
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, x_BxSxC: jax.Array, sin_SxH: jax.Array, cos_SxH: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt, c, h = cfg.activation_dtype, cfg.d_model, cfg.head_dim

    def proj(name, heads):
      return nn.DenseGeneral(
          (heads, h), use_bias=False, dtype=dt, name=name,
          kernel_init=dense_init(c, ("embed", "heads", "kv")))(x_BxSxC)

    q_BxSxNxH = apply_rope(proj("query", cfg.num_heads), sin_SxH, cos_SxH)
    k_BxSxKxH = apply_rope(proj("key", cfg.kv_heads), sin_SxH, cos_SxH)
    v_BxSxKxH = proj("value", cfg.kv_heads)
    # Init sees a one-row example batch; the parameters do not depend on the kernel.
    impl = ("xla" if self.is_initializing() else
            platform.attention_impl(cfg.attention_impl, seq_len=x_BxSxC.shape[1], dtype=dt,
                                    mesh=self.mesh))
    out_BxSxNxH = causal_attention(q_BxSxNxH, k_BxSxKxH, v_BxSxKxH, impl=impl, mesh=self.mesh)
    return nn.DenseGeneral(
        c, axis=(-2, -1), use_bias=False, dtype=dt, name="out",
        kernel_init=dense_init(c, ("heads", "kv", "embed")))(out_BxSxNxH)


class SwiGLU(nn.Module):
  """`W_out (silu(x W_gate) * x W_up)`."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxSxC: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt, c, f = cfg.activation_dtype, cfg.d_model, cfg.hidden_dim
    gate_up = nn.DenseGeneral(
        (2, f), use_bias=False, dtype=dt, name="gate_up",
        kernel_init=dense_init(c, ("embed", None, "mlp")))(x_BxSxC)
    hidden_BxSxF = nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
    hidden_BxSxF = nn.with_logical_constraint(hidden_BxSxF, ("batch", "length", "mlp"))
    return nn.Dense(c, use_bias=False, dtype=dt, name="down",
                    kernel_init=dense_init(f, ("mlp", "embed")))(hidden_BxSxF)
