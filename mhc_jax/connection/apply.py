"""A connection layer as functions of its parameters: expand, connect, collapse (math.md §2–6).

`connect` is one layer of Eq. 3, `x' = H_res x + H_postᵀ F(H_pre x)`, around any sublayer
callable `F`; `expand` enters the streams and `collapse` leaves them. The Linen and NNX modules
(`mhc_jax.linen`, `mhc_jax.nnx`) own the parameters and call these, so both APIs run one
implementation, with the fused kernels under `impl="pallas"`.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mhc_jax.connection.spec import ConnectionSpec, check_collapse
from mhc_jax.core.coefficients import coefficients_from_logits, dynamic_logits, rms_scale
from mhc_jax.core.permutations import lite_coefficients, lite_coefficients_from_logits
from mhc_jax.core.streams import expand_stream_rows, expand_streams
from mhc_jax.parallel import kernels, platform

Params = dict[str, jax.Array]


class Coefficients(NamedTuple):
  h_pre: jax.Array  # (B, S, n), float32
  h_post: jax.Array  # (B, S, n), float32
  h_res: jax.Array  # (B, S, n, n), float32; h_res[i, j] weighs input stream j in output i


def expand(x_BxSxC: jax.Array, n: int, *, token_rows: bool = False) -> jax.Array:
  """Entry (math.md §5): the input copied to `n` streams, `(B, S, C) -> (B, S, n, C)`, or token
  rows `(B, S, n*C)` with `token_rows=True`."""
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"expand: n={n!r} is invalid; pass the number of streams (>= 1).")
  return expand_stream_rows(x_BxSxC, n) if token_rows else expand_streams(x_BxSxC, n)


def stream_width(streams: jax.Array, n: int, token_rows: bool, owner: str = "Connection") -> int:
  """`C` of streams `(..., n, C)` (or token rows `(..., n*C)`), or an error naming the fix."""
  if token_rows:
    if streams.ndim < 2 or streams.shape[-1] % n:
      raise ValueError(f"{owner}: token-row streams must have shape (..., n*C) with n={n}; got "
                       f"{streams.shape}. Build them with expand(x, n, token_rows=True).")
    return streams.shape[-1] // n
  if streams.ndim < 3 or streams.shape[-2] != n:
    raise ValueError(f"{owner}: streams must have shape (B, S, n, C) with n={n}; got "
                     f"{streams.shape}. Build them from a (B, S, C) input with expand(x, n={n}).")
  return streams.shape[-1]


def resolve_impl(impl: str, spec: ConnectionSpec, d_model: int,
                 mesh: jax.sharding.Mesh | None = None) -> str:
  """`"pallas"` where the mHC kernels apply (mHC with a supported width), else `"xla"`."""
  if impl not in platform.MHC_IMPLS:
    raise ValueError(f"Connection: impl={impl!r} is invalid; choose one of {platform.MHC_IMPLS}.")
  return platform.mhc_impl(impl, connection=spec.kind, n_streams=spec.n, d_model=d_model,
                           mesh=mesh)


def _hc_coefficients(spec: ConnectionSpec, p: Params, x_xNxC: jax.Array) -> Coefficients:
  """Dynamic HC (math.md §6): static matrices plus `s * tanh(norm(x_i) W)`."""
  x = x_xNxC.astype(jnp.float32)
  x_bar = x * rms_scale(x, spec.norm_eps) * p["norm"]
  z_xNx2n = jnp.tanh(jnp.dot(x_bar, p["w"], precision=jax.lax.Precision.HIGHEST))
  h_pre = p["static_pre"] + p["scale"][0] * z_xNx2n[..., 0]
  h_post = p["static_post"] + p["scale"][1] * z_xNx2n[..., 1]
  # z[..., j, 2 + i] is input stream j's dynamic weight into output i: H_res = A_rᵀ.
  h_res = p["static_res"] + p["scale"][2] * jnp.swapaxes(z_xNx2n[..., 2:], -1, -2)
  return Coefficients(h_pre, h_post, h_res)


def coefficients(spec: ConnectionSpec, params: Params, streams: jax.Array, *, impl: str = "xla",
                 mesh: jax.sharding.Mesh | None = None, token_rows: bool = False
                 ) -> Coefficients:
  """Float32 `(h_pre (..., n), h_post (..., n), h_res (..., n, n))` of one layer.

  `impl` is already resolved (`resolve_impl`). Token rows reach the kernels as they are; the XLA
  paths read them as `(..., n, C)`.
  """
  n = spec.n
  c = stream_width(streams, n, token_rows)
  lead = streams.shape[:-1] if token_rows else streams.shape[:-2]
  rows_to_kernels = token_rows and impl == "pallas"
  x_xNxC = streams if rows_to_kernels else streams.reshape(*lead, n, c)
  if spec.kind == "residual":
    return Coefficients(jnp.ones((*lead, 1)), jnp.ones((*lead, 1)), jnp.ones((*lead, 1, 1)))
  if spec.kind == "hc":
    return _hc_coefficients(spec, params, x_xNxC)
  lite = spec.kind == "mhc_lite"
  if not spec.dynamic:
    logits = jnp.broadcast_to(params["bias"], (*lead, spec.num_logits))
    if lite:
      return Coefficients(*lite_coefficients_from_logits(logits, n, eps=spec.eps))
    return Coefficients(*coefficients_from_logits(logits, n, num_iters=spec.sinkhorn_iters,
                                                  eps=spec.eps))
  args = (params["phi"], params["alpha"], params["bias"])
  if lite:
    return Coefficients(*lite_coefficients(x_xNxC, *args, eps=spec.eps))
  return Coefficients(*kernels.mhc_coefficients(
      x_xNxC, *args, num_iters=spec.sinkhorn_iters, eps=spec.eps, impl=impl, mesh=mesh,
      token_rows=rows_to_kernels))


def connect(spec: ConnectionSpec, params: Params, streams: jax.Array,
            sublayer: Callable[[jax.Array], jax.Array], *, impl: str = "xla",
            mesh: jax.sharding.Mesh | None = None, token_rows: bool = False
            ) -> tuple[jax.Array, Coefficients]:
  """One connection layer around `sublayer`: `(new streams, coefficients)`.

  `u = pre_mix(x, H_pre)`, `y = sublayer(u)` (named `sublayer_out` for the `mhc_block` remat
  policy), `x' = post_res_mix(x, y, H_post, H_res)`. The sublayer maps `(B, S, C)` to
  `(B, S, C)` and includes its own pre-norm.
  """
  coeffs = coefficients(spec, params, streams, impl=impl, mesh=mesh, token_rows=token_rows)
  ops = dict(impl=impl, mesh=mesh, token_rows=token_rows)
  if token_rows and impl != "pallas":  # the XLA mixing reads (..., n, C)
    c = streams.shape[-1] // spec.n
    x = streams.reshape(*streams.shape[:-1], spec.n, c)
    ops["token_rows"] = False
  else:
    x = streams
  u_BxSxC = kernels.pre_mix(x, coeffs.h_pre, **ops)
  y_BxSxC = sublayer(u_BxSxC)
  if not hasattr(y_BxSxC, "shape") or y_BxSxC.shape != u_BxSxC.shape:
    raise ValueError(f"Connection: sublayer must map its input of shape {u_BxSxC.shape} to the "
                     f"same shape; it returned {getattr(y_BxSxC, 'shape', type(y_BxSxC))}.")
  y_BxSxC = checkpoint_name(y_BxSxC, "sublayer_out")
  out = kernels.post_res_mix(x, y_BxSxC, coeffs.h_post, coeffs.h_res, **ops)
  return out.reshape(streams.shape), coeffs


def collapse(mode: str, params: Params, x_BxSxNxC: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Exit (math.md §5): `(B, S, n, C) -> (B, S, C)`, gated (DeepSeek's), sum or mean."""
  check_collapse(mode)
  if x_BxSxNxC.ndim < 3:
    raise ValueError(f"Collapse: streams must have shape (B, S, n, C); got {x_BxSxNxC.shape}.")
  if mode == "sum":
    return jnp.sum(x_BxSxNxC, axis=-2)
  if mode == "mean":
    return jnp.mean(x_BxSxNxC, axis=-2)
  logits = dynamic_logits(x_BxSxNxC, params["phi"], params["alpha"], params["bias"], eps)
  w_BxSxN = jax.nn.sigmoid(logits) + eps
  y = jnp.sum(w_BxSxN[..., None] * x_BxSxNxC.astype(jnp.float32), axis=-2)
  return y.astype(x_BxSxNxC.dtype)

