"""Pallas kernels for mHC (spec §9): fused coefficients, `pre_mix`, fused `post_res_mix`.

Interpret mode on CPU, Mosaic on TPU, Triton on GPU; see README.md.
"""

from kernels_pallas.api import mhc_coefficients, post_res_mix, pre_mix
from kernels_pallas.common import BlockSizes, backend, check_supported, supports
