"""Named accelerator targets for compile-only builds: chip figures and compile-only devices.

`v5e-N` and `v6e-N` name slices of N chips and `v5p-N` slices of N TensorCores (two per chip), as
Cloud TPU's accelerator types do: `v5p-8` is 4 chips. `h100` is one NVIDIA H100 SXM. The devices
come from `jax.experimental.topologies`: libtpu compiles for the TPU topology, and the CUDA plugin
for an H100, on a host that has neither.
"""

import dataclasses
import importlib.util

import jax
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
TPU_INSTALL = "pip install 'jax[tpu]' (libtpu compiles for TPUs from any host)"


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
    raise ValueError("--target=h100: compile-only builds for GPUs are not wired up yet; use a "
                     "TPU target (v5e-N, v5p-N, v6e-N).")
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"--target={target.name} needs libtpu, which is not installed: "
                     f"{TPU_INSTALL}.")
  return list(topologies.get_topology_desc(target.topology, platform="tpu").devices)
