"""Compile-only builds of the train step for a named target, from a host without the hardware.

`compile_report(config, target)` builds the exact step `launch.train` runs (`train.jit_train_step`
on the state and batch shardings of the run's mesh), compiles it with the target's real compiler
(XLA:TPU and Mosaic through libtpu), and reads back per-device memory and the collectives in the
compiled program. FLOPs come from `mhc_jax.flops`. HBM bytes per step come from XLA's cost
analysis, which counts a scanned layer once: they are extrapolated from unrolled builds with one and
two blocks, `bytes(L) = bytes(1) + (L - 1) * (bytes(2) - bytes(1))`.
"""

import copy
import dataclasses
import re
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mhc_jax import sharding, train
from mhc_jax.config import ModelConfig
from mhc_jax.flops import train_flops_per_step
from mhc_jax.targets import Target, compile_only_devices

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# An HLO instruction reads `%name = <shape> op(operands)`: match the op, not the name.
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def compile_train_step(config: ml_collections.ConfigDict, devices: list) -> Any:
  """The compiled train step of `config` on a mesh of `devices` (compile-only devices work)."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model, devices)
  if config.batch_size % mesh.shape["data"]:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the "
                     f"{mesh.shape['data']} data-parallel devices of the mesh.")
  state, state_shard = train.build_abstract_state(config, mesh)
  batch_shard = sharding.batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jnp.int32,
                                sharding=batch_shard)
  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return train.jit_train_step(state_shard, batch_shard).lower(
        state, {"inputs": tokens, "targets": tokens}).compile()


def collectives(compiled) -> dict[str, int]:
  """How many of each collective the compiled program has (async `-start`/`-done` pairs once)."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for match in _COLLECTIVE_RE.finditer(compiled.as_text()):
    counts[match.group(1)] += 1
  return {k: v for k, v in counts.items() if v}


def _bytes_accessed(config: ml_collections.ConfigDict, devices: list,
                    num_layers: int) -> float | None:
  small = copy.deepcopy(config)
  small.model.num_layers, small.model.scan_layers = num_layers, False
  cost = compile_train_step(small, devices).cost_analysis()
  return None if cost is None else float(cost["bytes accessed"])


def hbm_bytes_per_step(config: ml_collections.ConfigDict, devices: list) -> float | None:
  """Per-device HBM bytes of one step, extrapolated from unrolled 1- and 2-block builds; None
  where the compiler gives no cost analysis (XLA:GPU)."""
  one = _bytes_accessed(config, devices, 1)
  if one is None:
    return None
  two = _bytes_accessed(config, devices, 2)
  return one + (config.model.num_layers - 1) * (two - one)


@dataclasses.dataclass
class CompileReport:
  """What a compile-only build says about one train step on one target (bytes per device)."""
  target: str
  chip: str
  chips: int
  compile_s: float
  per_device_bytes: dict[str, float]
  hbm_bytes: float
  fits: bool
  flops_per_step: float
  hbm_bytes_per_step: float | None  # None: no cost analysis (the roofline is compute only)
  roofline_step_s: float
  mfu: float
  collectives: dict[str, int]

  def lines(self) -> list[str]:
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    mem = self.per_device_bytes
    verdict = ("fits" if self.fits else
               f"short by {gib(mem['total'] - self.hbm_bytes)}")
    return [
        f"target {self.target}: {self.chips} x {self.chip}, compiled in {self.compile_s:.1f} s",
        "per device: " + ", ".join(f"{k} {gib(v)}" for k, v in mem.items()),
        f"  against {gib(self.hbm_bytes)} of HBM: {verdict}",
        f"FLOPs per step (analytic, all devices): {self.flops_per_step:.4g}",
        "HBM bytes per step per device (XLA cost analysis, scan extrapolated): " + (
            f"{self.hbm_bytes_per_step:.4g}" if self.hbm_bytes_per_step is not None else
            "not available for this target (its compiler gives no cost analysis); the "
            "roofline below is compute-only"),
        f"collectives: {self.collectives or 'none'}",
        f"roofline step time {self.roofline_step_s * 1e3:.2f} ms, MFU {100 * self.mfu:.3g}%"
        + ("" if self.hbm_bytes_per_step is not None else " (compute only: an upper bound)"),
    ]


def compile_report(config: ml_collections.ConfigDict, target: Target) -> CompileReport:
  """Compiles `config`'s train step for `target` and measures it (see the module docstring)."""
  if config.model.mhc_impl == "pallas":
    raise ValueError(
        "config.model.mhc_impl='pallas' cannot be compiled for a target yet: the model does not "
        "yet apply the kernels through shard_map under a mesh, and the kernels pick their "
        "backend from the host, not the target. Use --config.model.mhc_impl=xla.")
  devices = compile_only_devices(target)
  mesh_size = (config.mesh.data if config.mesh.data > 0 else 1) * config.mesh.model
  if config.mesh.data > 0 and mesh_size != len(devices):
    raise ValueError(f"config.mesh.data={config.mesh.data} x config.mesh.model="
                     f"{config.mesh.model} = {mesh_size} does not match the {len(devices)} "
                     f"chips of --target={target.name}; set config.mesh.data=-1.")
  start = time.perf_counter()
  compiled = compile_train_step(config, devices)
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  per_device = {
      "arguments": float(mem.argument_size_in_bytes),
      "outputs": float(mem.output_size_in_bytes),
      "temp": float(mem.temp_size_in_bytes),
      "code": float(mem.generated_code_size_in_bytes),
  }
  # Donated arguments share their buffers with the outputs: count those once.
  per_device["total"] = sum(per_device.values()) - float(mem.alias_size_in_bytes)
  model_cfg = ModelConfig.from_dict(config.model)
  flops = train_flops_per_step(model_cfg, config.seq_len, config.batch_size)
  hbm = hbm_bytes_per_step(config, devices)
  chip = target.chip
  compute_s = flops / target.chips / chip.peak_bf16_flops
  step_s = max(compute_s, (hbm or 0.0) / chip.hbm_bandwidth)
  return CompileReport(
      target=target.name, chip=chip.name, chips=target.chips, compile_s=compile_s,
      per_device_bytes=per_device, hbm_bytes=chip.hbm_bytes,
      fits=per_device["total"] <= chip.hbm_bytes, flops_per_step=flops,
      hbm_bytes_per_step=hbm, roofline_step_s=step_s, mfu=compute_s / step_s,
      collectives=collectives(compiled))
