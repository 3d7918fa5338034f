"""What a connection is: its settings (`ConnectionSpec`) and the parameters it owns.

The Linen and NNX modules (`mhc_jax.linen`, `mhc_jax.nnx`) both declare their parameters from
`connection_params` and `collapse_params`, so the two APIs hold the same arrays under the same
names, with the same initialisation (math.md §3, §5, §6):

| kind | parameters (C = d_model, K = n² + 2n, K' = n! + 2n) | count |
|---|---|---|
| `residual` | none | 0 |
| `hc` | `static_pre (n)`, `static_post (n)`, `static_res (n, n)`, `scale (3)`, `norm (C)`, `w (C, n + 2)` | `n² + 2n + 3 + C(n + 3)` |
| `mhc` | `phi (nC, K)`, `alpha (3)`, `bias (K)` | `(nC + 1) K + 3` |
| `mhc_lite` | `phi (nC, K')`, `alpha (3)`, `bias (K')` | `(nC + 1) K' + 3` |

Static mHC (`dynamic=False`) keeps only `bias`. The gated exit owns `phi (nC, n)`, `alpha ()` and
`bias (n)`.
"""

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from mhc_jax.core.coefficients import num_logits
from mhc_jax.core.permutations import MAX_STREAMS as MAX_LITE_STREAMS
from mhc_jax.core.permutations import num_lite_logits

KINDS = ("residual", "hc", "mhc", "mhc_lite")
COLLAPSES = ("gated", "sum", "mean")

Init = Callable[..., jax.Array]  # a jax.nn.initializers initializer: (key, shape, dtype)


class ParamSpec(NamedTuple):
  shape: tuple[int, ...]
  init: Init
  axes: tuple[str | None, ...]  # logical axis names (mhc_jax.parallel.sharding), one per dim


def _fail(owner: str, name: str, value: Any, fix: str):
  raise ValueError(f"{owner}: {name}={value!r} is invalid; {fix}")


@dataclasses.dataclass(frozen=True)
class ConnectionSpec:
  """The settings of one connection layer; checked when built, naming the argument and the fix."""
  kind: str = "mhc"  # residual | hc | mhc | mhc_lite
  n: int = 4  # streams (the expansion rate); residual has 1
  sinkhorn_iters: int = 20  # Sinkhorn–Knopp iterations of mHC's H_res
  eps: float = 1e-6  # eps of the coefficient RMS, of H_pre and of Sinkhorn (math.md §3)
  alpha_init: float = 0.01  # initial alpha_pre/post/res (paper Table 5)
  res_identity_bias: float = 0.0  # tau in b_res = tau * I; 0 starts H_res uniform
  dynamic: bool = True  # False: coefficients from the bias alone (static mHC)
  hc_scale: float = 0.01  # s of HC's dynamic terms (Zhu et al.)
  norm_eps: float = 1e-6  # eps of HC's per-stream RMSNorm

  def __post_init__(self):
    owner = "Connection"
    if self.kind not in KINDS:
      _fail(owner, "kind", self.kind, f"choose one of {KINDS}.")
    if not isinstance(self.n, int) or self.n < 1:
      _fail(owner, "n", self.n, "must be a positive integer (the paper uses 4).")
    if self.kind == "residual" and self.n != 1:
      _fail(owner, "n", self.n, "kind='residual' has one stream; pass n=1.")
    if self.kind == "mhc_lite" and self.n > MAX_LITE_STREAMS:
      _fail(owner, "n", self.n, f"mhc_lite mixes all n! permutation matrices; use "
            f"n <= {MAX_LITE_STREAMS} or kind='mhc'.")
    if self.sinkhorn_iters < 1:
      _fail(owner, "sinkhorn_iters", self.sinkhorn_iters, "must be >= 1 (the paper uses 20).")
    for name in ("eps", "norm_eps"):
      if not getattr(self, name) > 0:
        _fail(owner, name, getattr(self, name), "must be > 0.")

  @property
  def num_logits(self) -> int:
    """Width of mHC's (or mHC-lite's) coefficient projection."""
    return num_lite_logits(self.n) if self.kind == "mhc_lite" else num_logits(self.n)


def check_collapse(mode: str) -> None:
  if mode not in COLLAPSES:
    _fail("Collapse", "mode", mode, f"choose one of {COLLAPSES}.")


def _one_hot(index, n: int) -> Init:
  return lambda key, shape, dtype=jnp.float32: jax.nn.one_hot(index % n, n, dtype=dtype)


def _eye(n: int) -> Init:
  return lambda key, shape, dtype=jnp.float32: jnp.eye(n, dtype=dtype)


def _mhc_bias(spec: ConnectionSpec) -> Init:
  """`[0 (pre) | 0 (post) | tau * identity (res)]`: the identity is permutation 0 for mHC-lite."""
  n, tau = spec.n, spec.res_identity_bias
  if spec.kind == "mhc_lite":
    res = tau * jax.nn.one_hot(0, spec.num_logits - 2 * n)
  else:
    res = tau * jnp.eye(n).reshape(-1)
  return lambda key, shape, dtype=jnp.float32: jnp.concatenate([jnp.zeros(2 * n), res]).astype(
      dtype)


def connection_params(spec: ConnectionSpec, d_model: int,
                      layer_index: int | jax.Array = 0) -> dict[str, ParamSpec]:
  """The parameters of one connection layer of width `d_model`, by name.

  `layer_index` (0, 1, 2, ... over the sublayers; traced values are fine) only matters for HC,
  whose static `H_pre` is one-hot on stream `layer_index mod n`, so that HC at init computes
  what the residual network computes.
  """
  n, c, init = spec.n, d_model, jax.nn.initializers
  if spec.kind == "residual":
    return {}
  if spec.kind == "hc":
    return {
        "static_pre": ParamSpec((n,), _one_hot(layer_index, n), ("streams",)),
        "static_post": ParamSpec((n,), init.ones, ("streams",)),
        # A logical name may appear once per array: the output-stream axis goes unnamed.
        "static_res": ParamSpec((n, n), _eye(n), ("streams", None)),
        "scale": ParamSpec((3,), init.constant(spec.hc_scale), (None,)),
        "norm": ParamSpec((c,), init.ones, ("norm",)),
        "w": ParamSpec((c, n + 2), init.zeros, ("embed", None)),
    }
  k = spec.num_logits
  params = {"bias": ParamSpec((k,), _mhc_bias(spec), (None,))}
  if spec.dynamic:
    params["alpha"] = ParamSpec((3,), init.constant(spec.alpha_init), (None,))
    params["phi"] = ParamSpec((n * c, k), init.normal((n * c) ** -0.5), ("stream_embed", None))
  return params


def collapse_params(mode: str, n: int, d_model: int, alpha_init: float = 0.01
                    ) -> dict[str, ParamSpec]:
  """The exit's parameters: only the gated collapse has any (math.md §5)."""
  check_collapse(mode)
  if mode != "gated":
    return {}
  init, c = jax.nn.initializers, d_model
  return {
      "alpha": ParamSpec((), init.constant(alpha_init), ()),
      "bias": ParamSpec((n,), init.zeros, ("streams",)),
      "phi": ParamSpec((n * c, n), init.normal((n * c) ** -0.5), ("stream_embed", None)),
  }


def num_params(spec: ConnectionSpec, d_model: int) -> int:
  """Parameters of one connection layer (the table above)."""
  return sum(math.prod(p.shape) for p in connection_params(spec, d_model).values())
