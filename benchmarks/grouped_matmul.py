"""The experts' grouped matmuls on TPU: XLA's `ragged_dot` against the megablox kernels.

  .venv-tpu/bin/python -m benchmarks.grouped_matmul --target=v5p-8 --sizes=3b,9b
  .venv-tpu/bin/python -m benchmarks.grouped_matmul --target=v5p-32 --sizes=27b

For each paper size, compiles (compile-only, no TPU needed) one MoE layer's routed SwiGLU,
forward and backward, on one chip at the shape expert parallelism gives it: the chip's experts
(`num_experts / mesh.expert`) and its receive buffer (`mesh.expert` x the chip's token-expert
pairs of one microbatch; the pairs themselves spread evenly over the experts). Prints XLA's FLOPs
and bytes for each implementation, the roofline time `max(flops / peak, bytes / bandwidth)`, and
ragged_dot / megablox. The FLOPs and bytes of a Pallas kernel are the estimates its author
attached to it (megablox counts the whole buffer, though it visits only the routed rows' tiles).
"""

import functools
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=wrong-import-position

from configs.loader import load_config  # pylint: disable=wrong-import-position
from mhc_jax.aot import targets  # pylint: disable=wrong-import-position
from mhc_jax.model import moe  # pylint: disable=wrong-import-position
from mhc_jax.model.grouped_matmul import grouped_matmul  # pylint: disable=wrong-import-position

_TARGET = flags.DEFINE_string("target", "v5p-8", "Compile-only TPU target (mhc_jax.targets).")
_SIZES = flags.DEFINE_list("sizes", ["3b", "9b"], "configs/paper.py sizes (the target must be "
                           "the slice their mesh is set for: v5p-8 for 3b and 9b, v5p-32 for 27b).")
IMPLS = ("ragged_dot", "megablox")


def layer_shape(size: str, chips: int) -> dict[str, int]:
  """One chip's grouped-matmul problem for a paper size on `chips` chips, from its config."""
  cfg = load_config(f"configs/paper.py:{size}")
  m = cfg.model
  tokens = cfg.batch_size * cfg.seq_len // (cfg.grad_accum_steps * chips // cfg.mesh.model)
  pairs = tokens * m.experts_per_token
  return {"rows": cfg.mesh.expert * pairs, "pairs": pairs, "C": m.d_model, "F": m.expert_dim,
          "experts": m.num_experts // cfg.mesh.expert}


def compiled_cost(impl: str, shape: dict[str, int], device) -> dict[str, float]:
  """XLA's FLOPs and bytes of the layer's grouped SwiGLU and its gradients on `device`."""
  rows, c, f, e = shape["rows"], shape["C"], shape["F"], shape["experts"]
  matmul = functools.partial(grouped_matmul, impl=impl)

  def loss(x_AxC, w_in_ExCx2F, w_out_ExFxC, sizes_E):
    y_AxC = moe.grouped_swiglu(x_AxC, sizes_E, w_in_ExCx2F, w_out_ExFxC, matmul)
    return jnp.sum(y_AxC.astype(jnp.float32))

  args = (jax.ShapeDtypeStruct((rows, c), jnp.bfloat16),
          jax.ShapeDtypeStruct((e, c, 2 * f), jnp.bfloat16),
          jax.ShapeDtypeStruct((e, f, c), jnp.bfloat16),
          jax.ShapeDtypeStruct((e,), jnp.int32))
  replicated = NamedSharding(jax.sharding.Mesh([device], ("chip",)), P())
  step = jax.jit(jax.grad(loss, (0, 1, 2)), in_shardings=replicated)
  cost = step.lower(*args).compile().cost_analysis()
  return {"flops": float(cost["flops"]), "bytes": float(cost["bytes accessed"])}


def main(argv):
  del argv
  target = targets.parse_target(_TARGET.value)
  device = targets.compile_only_devices(target)[0]
  chip = target.chip
  print(f"{target.name} ({chip.name}): one MoE layer's routed SwiGLU, forward + backward, per chip")
  for size in _SIZES.value:
    shape = layer_shape(size, target.chips)
    analytic = 3 * 6 * shape["pairs"] * shape["C"] * shape["F"]  # fwd + 2x bwd, routed pairs only
    times = {}
    for impl in IMPLS:
      cost = compiled_cost(impl, shape, device)
      times[impl] = max(cost["flops"] / chip.peak_bf16_flops, cost["bytes"] / chip.hbm_bandwidth)
      print(f"  {size} {impl:10s} rows {shape['rows']:7d} x experts {shape['experts']:3d}: "
            f"{cost['flops'] / 1e12:7.2f} TFLOP ({cost['flops'] / analytic:5.2f}x the routed "
            f"pairs'), {cost['bytes'] / 1e9:7.2f} GB, roofline {times[impl] * 1e3:8.2f} ms")
    print(f"  {size} ragged_dot / megablox roofline: {times['ragged_dot'] / times['megablox']:.2f}")


if __name__ == "__main__":
  app.run(main)
