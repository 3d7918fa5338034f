"""mhc-jax: Manifold-Constrained Hyper-Connections for JAX/Flax language models.

The functions here work on arrays. `mhc_coefficients`, `pre_mix` and `post_res_mix` take
`impl="xla" | "pallas"` (the fused kernels, per device under `mesh=`); the rest is plain jnp.
To add mHC to a Flax model of your own, use `mhc_jax.nnx` or `mhc_jax.linen` (docs/api.md).
The package is layered (docs/design.md): `core` (math) < `parallel` < `connection` <
`linen`, `nnx` < `model` < `training` < `aot`, `study`.
"""

__version__ = "0.2.0"

from mhc_jax.core.coefficients import coefficients_from_logits, num_logits
from mhc_jax.core.diagnostics import (amax_gain, composite_backward, composite_forward,
                                      layer_diagnostics)
from mhc_jax.core.permutations import lite_coefficients, permutation_mixture
from mhc_jax.core.sinkhorn import sinkhorn_knopp
from mhc_jax.core.streams import expand_streams
from mhc_jax.parallel.kernels import mhc_coefficients, post_res_mix, pre_mix
