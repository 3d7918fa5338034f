"""The mHC ops by implementation: XLA (`mhc_jax.core`) or the Pallas kernels, per device.

`impl="pallas"` runs `kernels_pallas` on one device's tokens, through `shard_map` over the
mesh's batch axes when a mesh is given: XLA cannot partition a Mosaic or Triton call, and every
kernel is per token. phi, alpha and bias are replicated; their gradients are summed over the
token axes by `shard_map`'s transpose. The stream and feature axes are never sharded
(math.md §1); mesh axes that split neither (e.g. `model`) see replicated activations. Inside a
pipeline stage the `shard_map` nests in the pipeline's (`platform.kernel_shard_map`). The kernel
backend follows the mesh's devices (`platform.kernel_block_sizes`).

Streams are `(..., n, C)`, or token rows `(..., n*C)` with `token_rows=True` (the layout the
kernels read without a copy; the model carries them so under `impl="pallas"`).
"""

import functools

import jax
from jax.sharding import PartitionSpec as P

import kernels_pallas
from mhc_jax.core import coefficients as core_coefficients
from mhc_jax.core import streams as core_streams
from mhc_jax.parallel import platform, sharding


def _token_specs(mesh, token_rows, batch_axis=None, seq_axis=None):
  """Specs by role; tokens `(B, S)` split over `batch_axis` (default: the mesh's batch axes) and
  `seq_axis` (default: none)."""
  if batch_axis is None:
    batch_axis = sharding.batch_axes(mesh) or None
  tok = (batch_axis, seq_axis)
  return dict(streams=P(*tok, None) if token_rows else P(*tok, None, None), token=P(*tok, None),
              coef=P(*tok, None), res=P(*tok, None, None), rep=P())


def _check_impl(fn, impl):
  if impl not in platform.MHC_IMPLS:
    raise ValueError(f"{fn}: impl must be one of {platform.MHC_IMPLS}; got {impl!r}.")


def mhc_coefficients(x, phi, alpha, bias, *, num_iters: int = 20, eps: float = 1e-6,
                     post_scale: float = 2.0, impl: str = "xla", token_rows: bool = False,
                     mesh: jax.sharding.Mesh | None = None, block_sizes=None, batch_axis=None,
                     seq_axis=None):
  """`(h_pre, h_post, h_res)` from streams `x`; see `mhc_jax.core.coefficients.mhc_coefficients`.

  `impl="pallas"` runs the fused kernel (interpret mode on CPU), per device under `mesh` with
  the tokens split over `batch_axis` (default: the mesh's batch axes) and `seq_axis`.
  """
  _check_impl("mhc_coefficients", impl)
  kw = dict(num_iters=num_iters, eps=eps, post_scale=post_scale)
  if impl == "xla":
    if token_rows:
      raise ValueError("mhc_coefficients: token rows need impl='pallas'.")
    return core_coefficients.mhc_coefficients(x, phi, alpha, bias, **kw)
  op = functools.partial(kernels_pallas.mhc_coefficients, token_rows=token_rows,
                         block_sizes=platform.kernel_block_sizes(mesh, block_sizes), **kw)
  if mesh is None:
    return op(x, phi, alpha, bias)
  s = _token_specs(mesh, token_rows, batch_axis, seq_axis)
  return platform.kernel_shard_map(
      op, mesh, (s["streams"], s["rep"], s["rep"], s["rep"]), (s["coef"], s["coef"], s["res"]))(
          x, phi, alpha, bias)


def pre_mix(x, h_pre, *, impl: str = "xla", token_rows: bool = False,
            mesh: jax.sharding.Mesh | None = None, block_sizes=None, batch_axis=None,
            seq_axis=None):
  """`u = sum_i h_pre[i] x_i`, streams -> `(..., C)`."""
  _check_impl("pre_mix", impl)
  if impl == "xla":
    return core_streams.pre_mix(x, h_pre)
  op = functools.partial(kernels_pallas.pre_mix, token_rows=token_rows,
                         block_sizes=platform.kernel_block_sizes(mesh, block_sizes))
  if mesh is None:
    return op(x, h_pre)
  s = _token_specs(mesh, token_rows, batch_axis, seq_axis)
  return platform.kernel_shard_map(op, mesh, (s["streams"], s["coef"]), s["token"])(x, h_pre)


def post_res_mix(x, y, h_post, h_res, *, impl: str = "xla", token_rows: bool = False,
                 mesh: jax.sharding.Mesh | None = None, block_sizes=None, batch_axis=None,
                 seq_axis=None):
  """`x'_i = sum_j h_res[i, j] x_j + h_post[i] y`, streams in, streams of x's shape out."""
  _check_impl("post_res_mix", impl)
  if impl == "xla":
    return core_streams.post_res_mix(x, y, h_post, h_res)
  op = functools.partial(kernels_pallas.post_res_mix, token_rows=token_rows,
                         block_sizes=platform.kernel_block_sizes(mesh, block_sizes))
  if mesh is None:
    return op(x, y, h_post, h_res)
  s = _token_specs(mesh, token_rows, batch_axis, seq_axis)
  return platform.kernel_shard_map(
      op, mesh, (s["streams"], s["token"], s["coef"], s["res"]), s["streams"])(x, y, h_post, h_res)
