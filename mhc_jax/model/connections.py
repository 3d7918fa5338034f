"""Residual, Hyper-Connection (HC), mHC and mHC-lite connections, one interface (math.md §5–6).

A connection module maps the streams `x (B, S, n, C)` to float32 coefficients
`(h_pre (B, S, n), h_post (B, S, n), h_res (B, S, n, n))`, in paper orientation; the block
applies them with `pre_mix` and `post_res_mix` (`mhc_jax.parallel.kernels`). `ExitCollapse`
merges the streams into one before the final norm.
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mhc_jax.core.coefficients import (coefficients_from_logits, dynamic_logits, num_logits,
                                       rms_scale)
from mhc_jax.core.permutations import (lite_coefficients, lite_coefficients_from_logits,
                                       num_lite_logits)
from mhc_jax.model.config import ModelConfig
from mhc_jax.parallel import kernels


_logical = nn.with_logical_partitioning  # init with logical axis names (see sharding.py)


class Coefficients(NamedTuple):
  h_pre: jax.Array  # (B, S, n), float32
  h_post: jax.Array  # (B, S, n), float32
  h_res: jax.Array  # (B, S, n, n), float32; h_res[i, j] weighs input stream j in output i


class ResidualConnection(nn.Module):
  """Plain pre-norm residual: one stream, `x + F(norm(x))`; no parameters."""
  cfg: ModelConfig

  def __call__(self, x_BxSxNxC: jax.Array, sublayer_index: jax.Array) -> Coefficients:
    del sublayer_index
    lead = x_BxSxNxC.shape[:-2]
    return Coefficients(jnp.ones((*lead, 1)), jnp.ones((*lead, 1)), jnp.ones((*lead, 1, 1)))


class HyperConnection(nn.Module):
  """Dynamic HC (Zhu et al.): static matrices plus `s * tanh(norm(x_i) W)`, W initialised to 0.

  With the static init (`H_pre` one-hot on stream `k mod n`, `H_res = I`, `H_post = 1`) the
  network computes exactly what a pre-norm residual network with the same sublayers computes.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxSxNxC: jax.Array, sublayer_index: jax.Array) -> Coefficients:
    n, c = x_BxSxNxC.shape[-2:]
    one_hot = lambda *_: jax.nn.one_hot(sublayer_index % n, n)
    static_pre = self.param("static_pre", _logical(one_hot, ("streams",)), (n,))
    static_post = self.param("static_post", _logical(nn.initializers.ones, ("streams",)), (n,))
    eye = lambda *_: jnp.eye(n)
    # A logical name may appear once per array: the output-stream axis goes unnamed (and the
    # streams axis is never sharded anyway).
    static_res = self.param("static_res", _logical(eye, ("streams", None)), (n, n))
    s_init = nn.initializers.constant(self.cfg.hc_scale)
    scale_3 = self.param("scale", _logical(s_init, (None,)), (3,))
    norm_C = self.param("norm", _logical(nn.initializers.ones, ("norm",)), (c,))
    w_Cx2n = self.param("w", _logical(nn.initializers.zeros, ("embed", None)),
                        (c, 2 + n))
    x = x_BxSxNxC.astype(jnp.float32)
    x_bar = x * rms_scale(x, self.cfg.norm_eps) * norm_C
    z_BxSxNx2n = jnp.tanh(jnp.dot(x_bar, w_Cx2n, precision=jax.lax.Precision.HIGHEST))
    h_pre = static_pre + scale_3[0] * z_BxSxNx2n[..., 0]
    h_post = static_post + scale_3[1] * z_BxSxNx2n[..., 1]
    # z[..., j, 2 + i] is input stream j's dynamic weight into output i: H_res = A_r^T.
    h_res = static_res + scale_3[2] * jnp.swapaxes(z_BxSxNx2n[..., 2:], -1, -2)
    return Coefficients(h_pre, h_post, h_res)


class MHCConnection(nn.Module):
  """mHC (math.md §3), or mHC-lite (math.md §6) when `cfg.connection == "mhc_lite"`.

  Both compute their logits from the flattened streams the same way; mHC makes `H_res` doubly
  stochastic with Sinkhorn, mHC-lite mixes the `n!` permutation matrices.
  """
  cfg: ModelConfig
  impl: str = "xla"
  mesh: jax.sharding.Mesh | None = None  # pallas: the kernels run per device over its batch axes
  token_rows: bool = False  # the streams come as token rows (B, S, n*C) (pallas only)

  @nn.compact
  def __call__(self, streams: jax.Array, sublayer_index: jax.Array) -> Coefficients:
    """`streams`: `(B, S, n, C)`, or token rows `(B, S, n*C)` when `token_rows`."""
    del sublayer_index
    cfg = self.cfg
    n, c = cfg.n_streams, cfg.d_model
    lead = streams.shape[:-1] if self.token_rows else streams.shape[:-2]
    tau = cfg.mhc_res_identity_bias
    if cfg.connection == "mhc_lite":
      width = num_lite_logits(n)
      res_bias = tau * jax.nn.one_hot(0, width - 2 * n)  # the identity is permutation 0
      from_logits = functools.partial(lite_coefficients_from_logits, n=n, eps=cfg.mhc_eps)
      from_streams = functools.partial(lite_coefficients, eps=cfg.mhc_eps)
    else:
      width = num_logits(n)
      res_bias = tau * jnp.eye(n).reshape(-1)
      kw = dict(num_iters=cfg.sinkhorn_iters, eps=cfg.mhc_eps)
      from_logits = functools.partial(coefficients_from_logits, n=n, **kw)
      from_streams = functools.partial(kernels.mhc_coefficients, impl=self.impl, mesh=self.mesh,
                                       token_rows=self.token_rows, **kw)
    bias_init = lambda *_: jnp.concatenate([jnp.zeros(2 * n), res_bias])
    bias = self.param("bias", _logical(bias_init, (None,)), (width,))
    if not cfg.mhc_dynamic:
      return Coefficients(*from_logits(jnp.broadcast_to(bias, (*lead, width))))
    alpha_init = nn.initializers.constant(cfg.mhc_alpha_init)
    alpha = self.param("alpha", _logical(alpha_init, (None,)), (3,))
    phi = self.param("phi", _logical(
        nn.initializers.normal((n * c) ** -0.5), ("stream_embed", None)), (n * c, width))
    return Coefficients(*from_streams(streams, phi, alpha, bias))


class ExitCollapse(nn.Module):
  """Merges `(B, S, n, C)` streams into `(B, S, C)`: gated (DeepSeek-V4), sum or mean."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxSxNxC: jax.Array) -> jax.Array:
    cfg = self.cfg
    n, c = x_BxSxNxC.shape[-2:]
    mode = "sum" if cfg.connection in ("residual", "hc") else cfg.mhc_exit
    if mode == "sum":
      return jnp.sum(x_BxSxNxC, axis=-2)
    if mode == "mean":
      return jnp.mean(x_BxSxNxC, axis=-2)
    alpha = self.param("alpha", _logical(nn.initializers.constant(cfg.mhc_alpha_init), ()), ())
    bias_N = self.param("bias", _logical(nn.initializers.zeros, ("streams",)), (n,))
    phi = self.param("phi", _logical(
        nn.initializers.normal((n * c) ** -0.5), ("stream_embed", None)), (n * c, n))
    logits = dynamic_logits(x_BxSxNxC, phi, alpha, bias_N, cfg.mhc_eps)
    w_BxSxN = jax.nn.sigmoid(logits) + cfg.mhc_eps
    y = jnp.sum(w_BxSxN[..., None] * x_BxSxNxC.astype(jnp.float32), axis=-2)
    return y.astype(x_BxSxNxC.dtype)


def make_connection(cfg: ModelConfig, name: str, impl: str = "xla",
                    mesh: jax.sharding.Mesh | None = None, token_rows: bool = False) -> nn.Module:
  """The connection module of `cfg.connection` (token rows only for mHC under `impl='pallas'`)."""
  if cfg.connection == "residual":
    return ResidualConnection(cfg, name=name)
  if cfg.connection == "hc":
    return HyperConnection(cfg, name=name)
  return MHCConnection(cfg, impl=impl, mesh=mesh, token_rows=token_rows, name=name)
