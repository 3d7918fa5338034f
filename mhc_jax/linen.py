"""mHC in your own Flax Linen model: `expand`, a `Connection` around any sublayer, `Collapse`.

```python
import mhc_jax.linen as mhc

x = mhc.expand(x_BxSxC, n=4)                                   # (B, S, 4, C)
x = mhc.Connection(kind="mhc", n=4)(x, lambda u: attn(norm(u)), layer_index=2 * i)
y_BxSxC = mhc.Collapse("gated")(x)                             # before the final norm
```

`Connection` owns φ, α and b (or HC's matrices) with the paper's initialisation, and runs
`mhc_jax.connection.apply.connect`: the same functions as `mhc_jax.nnx` and as `DecoderLM`, whose
blocks are built from this module. `return_coeffs=True` also returns the layer's `Coefficients`
for `amax_gain`, `composite_forward` and `layer_diagnostics`.
"""

import dataclasses

import flax.linen as nn
import jax

from mhc_jax.connection.apply import (Coefficients, collapse, connect, expand, resolve_impl,
                                      stream_width)
from mhc_jax.connection.spec import (ConnectionSpec, ParamSpec, collapse_params,
                                     connection_params)

__all__ = ["Coefficients", "Collapse", "Connection", "expand"]


def _boxed(p: ParamSpec, logical_axes: bool):
  return nn.with_logical_partitioning(p.init, p.axes) if logical_axes else p.init


class Connection(nn.Module):
  """One connection layer, `x' = H_res x + H_postᵀ sublayer(H_pre x)` (math.md §2).

  Called as `(streams, sublayer, *, layer_index=0, return_coeffs=False)`. `streams` is
  `(B, S, n, C)` (token rows `(B, S, n*C)` with `token_rows=True`); `sublayer` maps `(B, S, C)`
  to `(B, S, C)` and includes its pre-norm; build its modules in your own module (as above), so
  that their parameters stay yours. `layer_index` (traced is fine) sets HC's one-hot
  init. Under `impl="pallas"` mHC runs the fused kernels (interpret mode on CPU), per device
  over the batch axes of `mesh` when one is given; the other kinds run XLA.
  """
  kind: str = "mhc"  # residual | hc | mhc | mhc_lite
  n: int = 4
  sinkhorn_iters: int = 20
  impl: str = "xla"  # xla | pallas
  eps: float = 1e-6
  alpha_init: float = 0.01
  res_identity_bias: float = 0.0
  dynamic: bool = True
  hc_scale: float = 0.01
  norm_eps: float = 1e-6
  mesh: jax.sharding.Mesh | None = None
  token_rows: bool = False
  # Declare parameters with logical axis names (`nn.with_logical_partitioning`), for sharding
  # rules; an `nn.scan` over them then needs `metadata_params={nn.PARTITION_NAME: ...}`.
  logical_axes: bool = False

  @property
  def spec(self) -> ConnectionSpec:
    return ConnectionSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(
        ConnectionSpec)})

  @nn.compact
  def __call__(self, streams: jax.Array, sublayer, *, layer_index=0, return_coeffs: bool = False):
    spec = self.spec
    d_model = stream_width(streams, spec.n, self.token_rows)
    params = {name: self.param(name, _boxed(p, self.logical_axes), p.shape)
              for name, p in connection_params(spec, d_model, layer_index).items()}
    # Initialise through XLA: the kernels' shard_map would not split a one-sequence init batch.
    impl = resolve_impl(self.impl, spec, d_model, self.mesh)
    impl = "xla" if self.is_initializing() else impl
    out, coeffs = connect(spec, params, streams, sublayer, impl=impl, mesh=self.mesh,
                          token_rows=self.token_rows)
    return (out, coeffs) if return_coeffs else out


class Collapse(nn.Module):
  """Exit, `(B, S, n, C) -> (B, S, C)`: `gated` (DeepSeek's, math.md §5), `sum` or `mean`."""
  mode: str = "gated"
  eps: float = 1e-6
  alpha_init: float = 0.01
  logical_axes: bool = False  # as Connection's

  @nn.compact
  def __call__(self, streams_BxSxNxC: jax.Array) -> jax.Array:
    if streams_BxSxNxC.ndim < 3:
      raise ValueError(f"Collapse: streams must have shape (B, S, n, C); got "
                       f"{streams_BxSxNxC.shape}.")
    n, c = streams_BxSxNxC.shape[-2:]
    params = {name: self.param(name, _boxed(p, self.logical_axes), p.shape)
              for name, p in collapse_params(self.mode, n, c, self.alpha_init).items()}
    return collapse(self.mode, params, streams_BxSxNxC, self.eps)
