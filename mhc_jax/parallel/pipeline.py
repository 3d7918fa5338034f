"""Pipeline parallelism over the mesh's `stage` axis: GPipe and circular schedules.

The `L` blocks split into `S * r` chunks of `L / (S r)` consecutive blocks (`S` stages, `r`
repeats). Device `s` of the `stage` axis holds chunks `s, s + S, ..., s + (r - 1) S`: one chunk
for GPipe (`r = 1`), `r` for the circular (interleaved) schedule, where each microbatch goes
round the ring of stages `r` times. The batch splits into `M` microbatches (rows `i::M`, so no
data moves). Inside `shard_map`, manual over `stage` only, every tick each stage runs one chunk
on one microbatch and passes the n-stream state `(b, S_len, n, C)` to the next stage by
`ppermute`.

Microbatch `m` on its `k`-th pass reaches stage `s` at tick `k M + m + d s`, where `d` is the
ticks per hop. With `overlap_sends` (`d = 2`) a stage sends the output of tick `t` during tick
`t + 1`, while it computes the next microbatch: the send and the compute are independent, so
the compiler may overlap all of it (`collective-permute-start` ... compute ... `-done`). The
price is a longer fill: `T = r M + d (S - 1)` ticks, of which a stage idles `d (S - 1)`, the
bubble fraction `d (S - 1) / (r M + d (S - 1))`. Without it (`d = 1`, the default) the send
follows the compute, and XLA:TPU still overlaps it with the tick's other work (the compiled
v5p builds in benchmarks/README.md, "Pipeline"), so the doubled fill is rarely worth it.
On its last stage a pass that is not the last goes back to stage 0, which keeps it until its
next pass starts; that needs `M >= d S` for the circular schedule.

Kernels that XLA cannot partition (the mHC kernels, splash attention) run in a `shard_map` of
their own, which nests in this one: it maps the other axes of the context mesh, whose `stage`
axis is already manual (`platform.kernel_shard_map`). A chunk with them is a rolled scan (see
`DecoderLM._pipelined`).

Backward: JAX differentiates the tick loop; the transpose of each `ppermute` is the reverse
`ppermute`, so gradients flow stage to stage backwards. Each chunk is the model's own block
stack (its remat policy, its recompute groups), so block recompute never crosses a stage.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

SCHEDULES = ("gpipe", "circular")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """`config.pipeline`: microbatches, schedule, repeats (circular only), overlap_sends."""
  microbatches: int = 1
  schedule: str = "gpipe"
  repeats: int = 1
  overlap_sends: bool = False

  @classmethod
  def from_dict(cls, d) -> "PipelineConfig":
    d = dict(d or {})
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"config.pipeline has unknown fields {sorted(unknown)}; known: "
                       f"{[f.name for f in dataclasses.fields(cls)]}.")
    return cls(**d)

  @property
  def hop_ticks(self) -> int:
    return 2 if self.overlap_sends else 1


def bubble_fraction(stages: int, cfg: PipelineConfig) -> float:
  """The fraction of ticks a stage idles: `d (S - 1) / (r M + d (S - 1))`."""
  fill = cfg.hop_ticks * (stages - 1)
  return fill / (cfg.repeats * cfg.microbatches + fill)


def check_pipeline(cfg: PipelineConfig, stages: int, *, num_layers: int, moe_blocks: int,
          scan_layers: bool, batch_size: int, batch_ways: int) -> None:
  """Raises a `ValueError` naming the field and the fix when the pipeline cannot run."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"config.pipeline.schedule={cfg.schedule!r}; expected one of {SCHEDULES}.")
  for name in ("microbatches", "repeats"):
    if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
      raise ValueError(f"config.pipeline.{name}={getattr(cfg, name)!r} must be an integer >= 1.")
  if cfg.schedule == "gpipe" and cfg.repeats != 1:
    raise ValueError(f"config.pipeline.repeats={cfg.repeats} needs "
                     "config.pipeline.schedule='circular' (GPipe makes one pass).")
  if cfg.schedule == "circular" and cfg.repeats < 2:
    raise ValueError("config.pipeline.schedule='circular' needs config.pipeline.repeats >= 2 "
                     "(with 1 it is GPipe).")
  if stages == 1:
    return
  if moe_blocks:
    raise ValueError(f"mesh.stage={stages} pipelines dense models only; model.moe_blocks="
                     f"{moe_blocks}: set mesh.stage=1 (use mesh.expert and mesh.fsdp instead).")
  if not scan_layers:
    raise ValueError(f"mesh.stage={stages} needs model.scan_layers=True.")
  chunks = stages * cfg.repeats
  if num_layers % chunks:
    raise ValueError(f"model.num_layers={num_layers} must split into mesh.stage={stages} x "
                     f"pipeline.repeats={cfg.repeats} = {chunks} equal chunks.")
  if cfg.schedule == "circular" and cfg.microbatches < cfg.hop_ticks * stages:
    raise ValueError(
        f"config.pipeline.microbatches={cfg.microbatches} must be >= "
        f"{cfg.hop_ticks * stages} for the circular schedule on {stages} stages "
        f"({'2 x ' if cfg.overlap_sends else ''}mesh.stage), or a pass would reach stage 0 "
        "before its previous pass left the last stage.")
  if batch_size % (cfg.microbatches * batch_ways):
    raise ValueError(
        f"config.batch_size={batch_size} must be divisible by pipeline.microbatches="
        f"{cfg.microbatches} x the {batch_ways} batch-parallel devices.")


def _microbatches(x_BxD: jax.Array, m: int) -> jax.Array:
  """`(B, ...)` -> `(M, B / M, ...)`, microbatch `i` = rows `i::M`."""
  return jnp.swapaxes(x_BxD.reshape(x_BxD.shape[0] // m, m, *x_BxD.shape[1:]), 0, 1)


def _unmicrobatch(x_MxbxD: jax.Array) -> jax.Array:
  return jnp.swapaxes(x_MxbxD, 0, 1).reshape(-1, *x_MxbxD.shape[2:])


def run_pipeline(chunk_fn: Callable[[Any, jax.Array, jax.Array], jax.Array], params_L: Any,
                 x_BxSxNxC: jax.Array, mesh: jax.sharding.Mesh, cfg: PipelineConfig
                 ) -> jax.Array:
  """The blocks `params_L` (leaves `(L, ...)`) applied to `x` through the pipeline.

  `chunk_fn(params_chunk, x_bxSxNxC, chunk_index)` applies one chunk of `L / (S r)` blocks
  (`chunk_index` traced, in `[0, S r)`). Returns the last block's output, `(B, S, n, C)`.
  """
  stages, reps, m, d = mesh.shape["stage"], cfg.repeats, cfg.microbatches, cfg.hop_ticks
  ticks = reps * m + d * (stages - 1)
  # (L, ...) -> (r, S, L / (S r), ...): chunk k S + s is [k, s], on stage s.
  chunked = jax.tree.map(lambda p: p.reshape(reps, stages, -1, *p.shape[1:]), params_L)
  ring = [(i, (i + 1) % stages) for i in range(stages)]

  def item(t, s):
    """`(valid, pass k, microbatch m)` on stage `s` at tick `t`."""
    w = t - d * s
    valid = (w >= 0) & (w < reps * m)
    w = jnp.clip(w, 0, reps * m - 1)
    return valid, w // m, w % m

  def per_stage(params_rx1, x_Mxb):
    s = jax.lax.axis_index("stage")
    params_r = jax.tree.map(lambda p: p[:, 0], params_rx1)
    zeros = jnp.zeros_like(x_Mxb[0])

    def tick(carry, t):
      recv, pending, loop_M, out_M = carry
      valid, k, mb = item(t, s)
      first = jnp.where(k == 0, x_Mxb[mb], loop_M[mb]) if reps > 1 else x_Mxb[mb]
      inp = jnp.where(s == 0, first, recv)
      params_k = jax.tree.map(lambda p: p[k], params_r) if reps > 1 else \
          jax.tree.map(lambda p: p[0], params_r)
      if d == 2:  # send the previous tick's output while computing this one
        recv = jax.lax.ppermute(pending, "stage", ring)
        out = chunk_fn(params_k, inp, k * stages + s)
        pending, sent_at = out, t - 1
      else:
        out = chunk_fn(params_k, inp, k * stages + s)
        recv, sent_at = jax.lax.ppermute(out, "stage", ring), t
      done = valid & (s == stages - 1) & (k == reps - 1)
      out_M = out_M.at[mb].set(jnp.where(done, out, out_M[mb]))
      if reps > 1:  # stage 0 keeps a pass coming back from the last stage for its next one
        back_valid, back_k, back_mb = item(sent_at, stages - 1)
        keep = (s == 0) & back_valid & (back_k < reps - 1)
        loop_M = loop_M.at[back_mb].set(jnp.where(keep, recv, loop_M[back_mb]))
      return (recv, pending, loop_M, out_M), None

    loop_M = jnp.zeros_like(x_Mxb) if reps > 1 else jnp.zeros((0,), x_Mxb.dtype)
    carry = (zeros, zeros, loop_M, jnp.zeros_like(x_Mxb))
    out_M = jax.lax.scan(tick, carry, jnp.arange(ticks))[0][3]
    return jax.lax.psum(jnp.where(s == stages - 1, out_M, 0), "stage")

  staged = jax.shard_map(
      per_stage, mesh=mesh, in_specs=(P(None, "stage"), P()), out_specs=P(),
      axis_names={"stage"}, check_vma=False)
  return _unmicrobatch(staged(chunked, _microbatches(x_BxSxNxC, m)))
