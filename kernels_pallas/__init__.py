"""Fused Pallas kernels for mHC (math.md §9): coefficients with on-chip Sinkhorn, `pre_mix`,
fused `post_res_mix`, each with its custom VJP. Imports only jax.

Interpret mode on CPU, Mosaic on TPU, Triton on GPU; see README.md.
"""

from kernels_pallas.coefficients import coefficients_reference, mhc_coefficients
from kernels_pallas.common import (BlockSizes, backend, backend_for_platform, check_supported,
                                   supports)
from kernels_pallas.post_res_mix import post_res_mix
from kernels_pallas.pre_mix import pre_mix
