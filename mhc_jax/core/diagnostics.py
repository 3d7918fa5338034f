"""Amax Gain Magnitude and related stability diagnostics (math.md §7, paper §3.1, Fig. 3 and 7).

Forward gain of `M`: `max_i |sum_j M[i, j]|` (largest absolute row sum); backward gain:
`max_j |sum_i M[i, j]|` (largest absolute column sum). Composite forward gain at layer `l` uses
`H_l ... H_1`, composite backward gain uses `H_L ... H_l`.
"""

import jax
import jax.numpy as jnp


def amax_gain(m_xNxN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns `(forward, backward)` gains of `(..., n, n)` matrices, each of shape `(...)`."""
  m = m_xNxN.astype(jnp.float32)
  forward = jnp.max(jnp.abs(jnp.sum(m, axis=-1)), axis=-1)
  backward = jnp.max(jnp.abs(jnp.sum(m, axis=-2)), axis=-1)
  return forward, backward


def composite_forward(h_LxNxN: jax.Array) -> jax.Array:
  """`P_l = H_l @ ... @ H_1` for every layer l; input and output `(L, ..., n, n)`."""
  def step(p, h):
    p = jnp.matmul(h, p, precision=jax.lax.Precision.HIGHEST)
    return p, p
  eye = jnp.broadcast_to(jnp.eye(h_LxNxN.shape[-1], dtype=h_LxNxN.dtype), h_LxNxN.shape[1:])
  return jax.lax.scan(step, eye, h_LxNxN)[1]


def composite_backward(h_LxNxN: jax.Array) -> jax.Array:
  """`Q_l = H_L @ ... @ H_l` for every layer l; input and output `(L, ..., n, n)`."""
  def step(q, h):
    q = jnp.matmul(q, h, precision=jax.lax.Precision.HIGHEST)
    return q, q
  eye = jnp.broadcast_to(jnp.eye(h_LxNxN.shape[-1], dtype=h_LxNxN.dtype), h_LxNxN.shape[1:])
  return jax.lax.scan(step, eye, h_LxNxN, reverse=True)[1]


def _token_axes(x: jax.Array, trailing: int) -> tuple[int, ...]:
  return tuple(range(1, x.ndim - trailing))


def layer_diagnostics(h_res_LxTxNxN: jax.Array) -> dict[str, jax.Array]:
  """Per-layer diagnostics of `H_res` for a stack of layers, each over tokens `T` (any shape).

  `*_avg` keys are gains of the token-averaged matrix; `*_tok` keys are the mean over tokens of
  per-token gains. Every value has shape `(L,)`.
  """
  h = h_res_LxTxNxN.astype(jnp.float32)
  axes = _token_axes(h, 2)
  out = {}
  fwd_c, bwd_c = composite_forward(h), composite_backward(h)
  for prefix, fwd_m, bwd_m in (("single", h, h), ("composite", fwd_c, bwd_c)):
    out[f"{prefix}_fwd_avg"] = amax_gain(jnp.mean(fwd_m, axis=axes))[0]
    out[f"{prefix}_bwd_avg"] = amax_gain(jnp.mean(bwd_m, axis=axes))[1]
    out[f"{prefix}_fwd_tok"] = jnp.mean(amax_gain(fwd_m)[0], axis=axes)
    out[f"{prefix}_bwd_tok"] = jnp.mean(amax_gain(bwd_m)[1], axis=axes)
  out["composite_min_col_sum"] = jnp.min(jnp.sum(jnp.mean(fwd_c, axis=axes), axis=-2), axis=-1)
  row_err = jnp.abs(jnp.sum(h, axis=-1) - 1.0)
  col_err = jnp.abs(jnp.sum(h, axis=-2) - 1.0)
  out["marginal_err"] = jnp.max(jnp.maximum(row_err, col_err), axis=(*axes, h.ndim - 2))
  return out
