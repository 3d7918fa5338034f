"""mHC in your own Flax NNX model: `expand`, a `Connection` around any sublayer, `Collapse`.

```python
import mhc_jax.nnx as mhc

self.attn_conn = mhc.Connection(d_model, kind="mhc", n=4, layer_index=2 * i, rngs=rngs)
...
x = mhc.expand(x_BxSxC, n=4)                                   # (B, S, 4, C)
x = self.attn_conn(x, lambda u: self.attn(self.norm(u)))
y_BxSxC = self.collapse(x)                                     # mhc.Collapse(d_model, 4, rngs=rngs)
```

The same parameters, initialisation and functions as `mhc_jax.linen.Connection`
(`mhc_jax.connection`); `return_coeffs=True` also returns the layer's `Coefficients` for
`amax_gain`, `composite_forward` and `layer_diagnostics`.
"""

import jax
from flax import nnx

from mhc_jax.connection.apply import (Coefficients, collapse, connect, expand, resolve_impl,
                                      stream_width)
from mhc_jax.connection.spec import ConnectionSpec, collapse_params, connection_params

__all__ = ["Coefficients", "Collapse", "Connection", "expand"]


def _check_width(owner: str, d_model) -> None:
  if not isinstance(d_model, int) or d_model < 1:
    raise ValueError(f"{owner}: d_model={d_model!r} is invalid; pass the width C of each stream.")


class Connection(nnx.Module):
  """One connection layer, `x' = H_res x + H_postᵀ sublayer(H_pre x)` (math.md §2).

  Built with the stream width `d_model` and the settings of `ConnectionSpec`; `layer_index`
  (0, 1, ... over sublayers; an array under `nnx.vmap` is fine) sets HC's one-hot init. Called
  as `(streams, sublayer, *, return_coeffs=False)` with streams `(B, S, n, C)` (token rows
  `(B, S, n*C)` with `token_rows=True`) and a sublayer `(B, S, C) -> (B, S, C)` that includes
  its pre-norm. `impl="pallas"` runs mHC's fused kernels, per device over `mesh`'s batch axes.
  """

  def __init__(self, d_model: int, *, kind: str = "mhc", n: int = 4, sinkhorn_iters: int = 20,
               impl: str = "xla", layer_index=0, eps: float = 1e-6, alpha_init: float = 0.01,
               res_identity_bias: float = 0.0, dynamic: bool = True, hc_scale: float = 0.01,
               norm_eps: float = 1e-6, mesh: jax.sharding.Mesh | None = None,
               token_rows: bool = False, rngs: nnx.Rngs):
    _check_width("Connection", d_model)
    self.spec = ConnectionSpec(kind=kind, n=n, sinkhorn_iters=sinkhorn_iters, eps=eps,
                               alpha_init=alpha_init, res_identity_bias=res_identity_bias,
                               dynamic=dynamic, hc_scale=hc_scale, norm_eps=norm_eps)
    self.impl = resolve_impl(impl, self.spec, d_model, mesh)
    self.d_model, self.mesh, self.token_rows = d_model, mesh, token_rows
    params = connection_params(self.spec, d_model, layer_index)
    self.param_names = tuple(params)
    for name, p in params.items():
      setattr(self, name, nnx.Param(p.init(rngs.params(), p.shape)))

  def __call__(self, streams: jax.Array, sublayer, *, return_coeffs: bool = False):
    width = stream_width(streams, self.spec.n, self.token_rows)
    if width != self.d_model:
      raise ValueError(f"Connection: streams have width C={width} (shape {streams.shape}); this "
                       f"connection was built with d_model={self.d_model}.")
    params = {name: getattr(self, name)[...] for name in self.param_names}
    out, coeffs = connect(self.spec, params, streams, sublayer, impl=self.impl, mesh=self.mesh,
                          token_rows=self.token_rows)
    return (out, coeffs) if return_coeffs else out


class Collapse(nnx.Module):
  """Exit, `(B, S, n, C) -> (B, S, C)`: `gated` (DeepSeek's, math.md §5), `sum` or `mean`.

  Only `gated` has parameters, so only it needs `rngs`.
  """

  def __init__(self, d_model: int, n: int, *, mode: str = "gated", eps: float = 1e-6,
               alpha_init: float = 0.01, rngs: nnx.Rngs | None = None):
    _check_width("Collapse", d_model)
    params = collapse_params(mode, n, d_model, alpha_init)
    if params and rngs is None:
      raise ValueError("Collapse: mode='gated' has parameters; pass rngs=nnx.Rngs(...).")
    self.mode, self.eps, self.shape = mode, eps, (n, d_model)
    self.param_names = tuple(params)
    for name, p in params.items():
      setattr(self, name, nnx.Param(p.init(rngs.params(), p.shape)))

  def __call__(self, streams_BxSxNxC: jax.Array) -> jax.Array:
    if streams_BxSxNxC.shape[-2:] != self.shape:
      raise ValueError(f"Collapse: streams must have shape (B, S, n, C) = (B, S, "
                       f"{self.shape[0]}, {self.shape[1]}); got {streams_BxSxNxC.shape}.")
    params = {name: getattr(self, name)[...] for name in self.param_names}
    return collapse(self.mode, params, streams_BxSxNxC, self.eps)
