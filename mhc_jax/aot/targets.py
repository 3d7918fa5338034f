"""Named accelerator targets for compile-only builds: chip figures and compile-only devices.

`v5e-N` and `v6e-N` name slices of N chips and `v5p-N` slices of N TensorCores (two per chip), as
Cloud TPU's accelerator types do: `v5p-8` is 4 chips. `h100` is one NVIDIA H100 SXM. The devices
come from `jax.experimental.topologies`: libtpu compiles for the TPU topology, and the CUDA plugin
(with `JAX_PLATFORMS=cpu`, and ptxas from the nvidia wheels) for an H100, on a host that has
neither.
"""

import dataclasses
import importlib.util
import os

from jax.experimental import topologies

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's public figures."""
  name: str
  peak_bf16_flops: float  # dense, per chip, FLOP/s
  hbm_bytes: float  # per chip
  hbm_bandwidth: float  # per chip, bytes/s
  source: str


CHIPS = {
    "v5e": Chip("TPU v5e", 197e12, 16 * GIB, 819e9,
                "Cloud TPU docs, 'TPU v5e' system architecture table"),
    "v5p": Chip("TPU v5p", 459e12, 95 * GIB, 2765e9,
                "Cloud TPU docs, 'TPU v5p' system architecture table"),
    "v6e": Chip("TPU v6e (Trillium)", 918e12, 32 * GIB, 1640e9,
                "Cloud TPU docs, 'TPU v6e' system architecture table"),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 80e9, 3.35e12,
                 "NVIDIA H100 Tensor Core GPU datasheet (SXM5, dense BF16)"),
}
# Chips -> topology of the slice, as Cloud TPU lays them out.
_TOPOLOGY_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
                256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
TPU_INSTALL = "pip install 'jax[tpu]' (libtpu compiles for TPUs from any host), or make tpu-venv"
CUDA_INSTALL = ("pip install 'jax[cuda13]' in an environment of its own (make cuda-venv), and run "
                "with JAX_PLATFORMS=cpu")
# What XLA:GPU needs to know of an H100 SXM to compile for one without it (a GpuTargetConfig text
# proto): compute capability 9.0, 132 SMs, 227 KiB opt-in shared memory per block, 64 Ki registers,
# 3.35 TB/s, 80 GB.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 85520809984 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # As given, e.g. "v5p-8".
  chip_key: str  # Key of CHIPS.
  chips: int
  topology: str  # e.g. "v5p:2x2x1"

  @property
  def chip(self) -> Chip:
    return CHIPS[self.chip_key]


def _names() -> str:
  v2 = ", ".join(f"v5e-{n}" for n in _TOPOLOGY_2D)
  v3 = ", ".join(f"v5p-{2 * n}" for n in _TOPOLOGY_3D)
  return f"{v2} (and v6e- likewise); {v3}; h100"


def parse_target(name: str) -> Target:
  """`v5e-N` / `v6e-N` (N chips), `v5p-N` (N TensorCores) or `h100`."""
  if name == "h100":
    return Target(name, "h100", 1, "1x1x1")
  family, _, size = name.partition("-")
  if family in ("v5e", "v6e") and size.isdigit() and int(size) in _TOPOLOGY_2D:
    return Target(name, family, int(size), f"{family}:{_TOPOLOGY_2D[int(size)]}")
  if family == "v5p" and size.isdigit() and int(size) // 2 in _TOPOLOGY_3D and int(size) % 2 == 0:
    chips = int(size) // 2
    return Target(name, family, chips, f"v5p:{_TOPOLOGY_3D[chips]}")
  raise ValueError(f"--target={name!r} is unknown: use one of {_names()}.")


def compile_only_devices(target: Target) -> list:
  """The target's devices, for `jax.jit(...).lower(...).compile()` without the hardware."""
  if target.chip_key == "h100":
    if importlib.util.find_spec("jax_cuda13_plugin") is None:
      raise ValueError(f"--target=h100 needs JAX's CUDA plugin, which is not installed: "
                       f"{CUDA_INSTALL}.")
    return list(topologies.get_topology_desc(
        platform="cuda", topology="1x1x1", target_config=H100_TARGET_CONFIG).devices)
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"--target={target.name} needs libtpu, which is not installed: "
                     f"{TPU_INSTALL}.")
  # Compile-only devices never open a TPU, so libtpu's one-process-per-host lock (which would
  # stop two builds at once) does not apply.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return list(topologies.get_topology_desc(target.topology, platform="tpu").devices)
