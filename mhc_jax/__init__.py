"""mhc-jax: Manifold-Constrained Hyper-Connections for JAX/Flax language models."""

from mhc_jax.coefficients import coefficients_from_logits, mhc_coefficients, num_logits
from mhc_jax.diagnostics import amax_gain, composite_backward, composite_forward, layer_diagnostics
from mhc_jax.sinkhorn import sinkhorn_knopp
from mhc_jax.streams import expand_streams, post_res_mix, pre_mix
from mhc_jax.permutations import lite_coefficients, permutation_mixture
