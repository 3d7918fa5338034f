"""Compile-only builds of the train step for a named target, from a host without the hardware.

`compile_report(config, target)` builds the exact step `launch.train` runs
(`training.state.jit_train_step` on the state and batch shardings of the run's mesh), compiles it with
the target's real compiler (XLA:TPU and Mosaic through libtpu), and reads back per-device memory and the collectives in the
compiled program (`hlo.py`). FLOPs come from `flops.py`. HBM bytes per step come from XLA's cost
analysis, which counts a scanned layer once: they are extrapolated from unrolled builds with one and
two blocks, `bytes(L) = bytes(1) + (L - 1) * (bytes(2) - bytes(1))` (for an MoE model, one and two
MoE blocks after its leading dense blocks).
"""

import copy
import dataclasses
import math
import re
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mhc_jax.aot import hlo
from mhc_jax.aot.flops import train_flops_per_step
from mhc_jax.aot.targets import Target, compile_only_devices
from mhc_jax.model.config import ModelConfig
from mhc_jax.parallel import platform, sharding
from mhc_jax.training import state as run_state

def compile_train_step(config: ml_collections.ConfigDict, devices: list) -> Any:
  """The compiled train step of `config` on a mesh of `devices` (compile-only devices work)."""
  mesh = sharding.mesh_from_config(config.mesh, devices)
  sharding.check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
  run_state.check_pipeline(config, mesh)
  state, state_shard = run_state.build_abstract_state(config, mesh)
  batch_shard = sharding.batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jnp.int32,
                                sharding=batch_shard)
  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return run_state.jit_train_step(state_shard, batch_shard, config.grad_accum_steps).lower(
        state, {"inputs": tokens, "targets": tokens}).compile()


def compile_unrolled(config: ml_collections.ConfigDict, devices: list, num_layers: int) -> Any:
  """The train step of one microbatch with `num_layers` blocks, unrolled (no layer scan, whose
  body XLA's cost analysis would count once)."""
  small = copy.deepcopy(config)
  small.model.num_layers, small.model.scan_layers = num_layers, False
  small.batch_size, small.grad_accum_steps = config.batch_size // config.grad_accum_steps, 1
  return compile_train_step(small, devices)


def _bytes_accessed(config: ml_collections.ConfigDict, devices: list,
                    num_layers: int) -> float | None:
  """XLA's bytes accessed by one unrolled step of one microbatch; None without cost analysis."""
  try:
    cost = compile_unrolled(config, devices, num_layers).cost_analysis()
  except jax.errors.JaxRuntimeError as e:
    if _oom_temp_bytes(e) is None:
      raise
    return None  # even the small build does not fit
  return None if cost is None else float(cost["bytes accessed"])


# XLA:TPU refuses a program that cannot fit: "... HLO temporaries (196.98G) exceeds ...".
_OOM_RE = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\)")


def _oom_temp_bytes(error: Exception) -> float | None:
  """The temporary bytes an out-of-memory compile error says it needed; None for other errors."""
  match = _OOM_RE.search(str(error))
  if not match:
    return None
  return float(match.group(1)) * 2 ** (10 * "KMGT".index(match.group(2)) + 10)


def _argument_bytes(config: ml_collections.ConfigDict, devices: list) -> float:
  """Per-device bytes of the train state and the batch, from their shapes and shardings."""
  mesh = sharding.mesh_from_config(config.mesh, devices)
  state, _ = run_state.build_abstract_state(config, mesh)
  state_bytes = sum(math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize
                    for s in jax.tree.leaves(state))
  return state_bytes + 2 * 4 * config.batch_size * config.seq_len / sharding.batch_parallelism(mesh)


def _optimizer_bytes(config: ml_collections.ConfigDict, devices: list) -> float:
  """XLA's bytes accessed by the optimizer update alone (clip, AdamW, apply) on this mesh."""
  mesh = sharding.mesh_from_config(config.mesh, devices)
  state, state_shard = run_state.build_abstract_state(config, mesh)
  update = jax.jit(lambda st, g: st.apply_gradients(grads=g),
                   in_shardings=(state_shard, state_shard.params), out_shardings=state_shard)
  return float(update.lower(state, state.params).compile().cost_analysis()["bytes accessed"])


def _param_bytes(config: ml_collections.ConfigDict, devices: list) -> float:
  """Per-device bytes of the (float32) parameters."""
  mesh = sharding.mesh_from_config(config.mesh, devices)
  state, _ = run_state.build_abstract_state(config, mesh)
  return sum(math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize
             for s in jax.tree.leaves(state.params))


def hbm_bytes_per_step(config: ml_collections.ConfigDict, devices: list) -> float | None:
  """Per-device HBM bytes of one step, extrapolated from unrolled builds with one and two blocks
  of the repeated kind (after the leading dense blocks of an MoE model); None where the compiler
  gives no cost analysis (XLA:GPU), the small builds do not fit either, or the model is
  pipelined (`mesh.stage > 1`).

  With `grad_accum_steps = k` the builds run one microbatch, and the step is counted as `k` times
  their forward and backward (their bytes less those of a separately built optimizer update),
  plus `k` reads and writes of the float32 gradient accumulator, plus one optimizer update.
  """
  if config.mesh.get("stage", 1) > 1:
    return None  # the 1- and 2-block builds cannot split over the stages
  lead = config.model.get("dense_blocks", 0) if config.model.get("num_experts", 0) else 0
  one = _bytes_accessed(config, devices, lead + 1)
  two = None if one is None else _bytes_accessed(config, devices, lead + 2)
  if two is None:
    return None
  step = one + (config.model.num_layers - lead - 1) * (two - one)
  k = config.grad_accum_steps
  if k == 1:
    return step
  update = _optimizer_bytes(config, devices)
  return k * (step - update + 2 * _param_bytes(config, devices)) + update


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
  kernels: dict[str, int]  # fused kernel calls (Pallas, cuDNN) in the compiled program, by name
  out_of_memory: bool = False  # the compiler refused it; temp is what it said it needed
  pipeline: str | None = None  # stages, schedule, microbatches, bubble fraction
  # Per stage-to-stage send (collective-permute): compute ops between its start and done (-1:
  # synchronous). Only meaningful for a pipelined model.
  pipeline_sends: list[int] = dataclasses.field(default_factory=list)
  # Copies, transposes or reshapes of the residual streams next to the mHC kernels
  # (`kernel_relayouts`); None when the model does not run them.
  stream_relayouts: list[str] | None = None
  # What built it: python, jax, jaxlib, flax, libtpu or the CUDA plugin (`toolchain_versions`).
  versions: dict[str, str] = dataclasses.field(default_factory=platform.toolchain_versions)

  def lines(self) -> list[str]:
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    mem = self.per_device_bytes
    verdict = ("fits" if self.fits else
               f"short by {gib(mem['total'] - self.hbm_bytes)}")
    built = (f"refused by the compiler for memory after {self.compile_s:.1f} s (temp is what it "
             "needed, arguments from the state's shapes)" if self.out_of_memory else
             f"compiled in {self.compile_s:.1f} s")
    return [
        f"target {self.target}: {self.chips} x {self.chip}, {built}",
        "per device: " + ", ".join(f"{k} {gib(v)}" for k, v in mem.items()),
        f"  against {gib(self.hbm_bytes)} of HBM: {verdict}",
        f"FLOPs per step (analytic, all devices): {self.flops_per_step:.4g}",
        "HBM bytes per step per device (XLA cost analysis, scan extrapolated): " + (
            f"{self.hbm_bytes_per_step:.4g}" if self.hbm_bytes_per_step is not None else
            "not measured (--nobytes, no cost analysis on this target, a pipelined model, or "
            "even one block does not fit); the roofline below is compute-only"),
        f"collectives: {self.collectives or 'none'}",
        f"fused kernels: {self.kernels or 'none'}",
        *([f"relayouts of the streams next to the mHC kernels: {self.stream_relayouts or 'none'}"]
          if self.stream_relayouts is not None else []),
        *([f"{self.pipeline}; sends: {len(self.pipeline_sends)} collective-permutes, compute "
           f"ops between start and done: {self.pipeline_sends}"] if self.pipeline else []),
        f"roofline step time {self.roofline_step_s * 1e3:.2f} ms, MFU {100 * self.mfu:.3g}%"
        + ("" if self.hbm_bytes_per_step is not None else " (compute only: an upper bound)"),
        "versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()),
    ]


def compile_report(config: ml_collections.ConfigDict, target: Target,
                   with_bytes: bool = True) -> CompileReport:
  """Compiles `config`'s train step for `target` and measures it (see the module docstring).

  `with_bytes=False` skips the unrolled builds behind the HBM bytes per step (the roofline is
  then compute-only).
  """
  devices = compile_only_devices(target)
  expert, fsdp = config.mesh.get("expert", 1), config.mesh.get("fsdp", 1)
  stage = config.mesh.get("stage", 1)
  mesh_size = ((config.mesh.data if config.mesh.data > 0 else 1) * stage * fsdp * expert
               * config.mesh.model)
  if config.mesh.data > 0 and mesh_size != len(devices):
    raise ValueError(f"config.mesh.stage={stage} x config.mesh.data={config.mesh.data} x "
                     f"config.mesh.fsdp={fsdp} x "
                     f"config.mesh.expert={expert} x config.mesh.model={config.mesh.model} = "
                     f"{mesh_size} does not match the {len(devices)} chips of "
                     f"--target={target.name}; set config.mesh.data=-1.")
  start = time.perf_counter()
  try:
    compiled = compile_train_step(config, devices)
  except jax.errors.JaxRuntimeError as e:
    temp = _oom_temp_bytes(e)
    if temp is None:
      raise
    compiled = None  # XLA refused it for memory: report what it said it needed
  compile_s = time.perf_counter() - start
  if compiled is not None:
    mem = compiled.memory_analysis()
    per_device = {
        "arguments": float(mem.argument_size_in_bytes),
        "outputs": float(mem.output_size_in_bytes),
        "temp": float(mem.temp_size_in_bytes),
        "code": float(mem.generated_code_size_in_bytes),
    }
    # Donated arguments share their buffers with the outputs: count those once.
    per_device["total"] = sum(per_device.values()) - float(mem.alias_size_in_bytes)
  else:
    args = _argument_bytes(config, devices)
    per_device = {"arguments": args, "outputs": 0.0, "temp": temp, "code": 0.0,
                  "total": args + temp}
  model_cfg = ModelConfig.from_dict(config.model)
  flops = train_flops_per_step(model_cfg, config.seq_len, config.batch_size)
  hbm = hbm_bytes_per_step(config, devices) if with_bytes else None
  chip = target.chip
  compute_s = flops / target.chips / chip.peak_bf16_flops
  step_s = max(compute_s, (hbm or 0.0) / chip.hbm_bandwidth)
  return CompileReport(
      target=target.name, chip=chip.name, chips=target.chips, compile_s=compile_s,
      per_device_bytes=per_device, hbm_bytes=chip.hbm_bytes,
      fits=compiled is not None and per_device["total"] <= chip.hbm_bytes, flops_per_step=flops,
      hbm_bytes_per_step=hbm, roofline_step_s=step_s, mfu=compute_s / step_s,
      collectives=hlo.collectives(compiled) if compiled is not None else {},
      kernels=hlo.fused_kernels(compiled) if compiled is not None else {},
      out_of_memory=compiled is None,
      pipeline=run_state.check_pipeline(config, sharding.mesh_from_config(config.mesh, devices)),
      pipeline_sends=hlo.overlapped_sends(compiled.as_text()) if compiled is not None else [],
      stream_relayouts=_stream_relayouts(config, devices, compiled))


def _stream_relayouts(config: ml_collections.ConfigDict, devices: list, compiled
                      ) -> list[str] | None:
  """`kernel_relayouts` of one device's `(tokens, n*C)` stream tensor."""
  model = ModelConfig.from_dict(config.model)
  if compiled is None or model.mhc_impl != "pallas":
    return None
  mesh = sharding.mesh_from_config(config.mesh, devices)
  tokens = config.batch_size // config.grad_accum_steps // sharding.batch_parallelism(mesh)
  return hlo.kernel_relayouts(compiled.as_text(),
                          tokens * config.seq_len * model.n_streams * model.d_model)
