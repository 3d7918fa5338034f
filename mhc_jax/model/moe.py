"""DeepSeek-V3-style mixture of experts: sigmoid top-k routing, loss-free balancing, dropless.

Per token `u`: affinities `s_e = sigmoid(u . r_e)`; the `k` experts with the largest `s_e + b_e`
are selected, where `b` is the balancing bias, which steers selection only; their gates are
`g_e = s_e / sum_selected(s)`, scaled by `routed_scaling`. The output is
`sum_shared FFN(u) + sum_selected g_e FFN_e(u)` with SwiGLU experts.

Loss-free balancing: `b` gets no gradient. After each train step it moves by
`gamma * sign(mean_load - load_e)`, toward the under-loaded experts (`bias_update`, applied by
`decoder.apply_balance_update`). An
optional sequence-wise balance loss is returned for the train step to add.

Dropless: tokens are sorted by expert and multiplied group by group, whatever the load
(`grouped_matmul.py`: the megablox kernels on TPU, `jax.lax.ragged_dot` elsewhere). With an
`expert` mesh axis > 1 the experts are split over it and tokens travel to their experts by
`all_to_all` inside `shard_map` (`dispatch_expert_parallel`).
"""

import functools
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mhc_jax.model.config import ModelConfig
from mhc_jax.model.grouped_matmul import grouped_matmul
from mhc_jax.model.layers import dense_init
from mhc_jax.parallel import platform, sharding

EXPERT_AXIS = "expert"
EXPERT_FSDP_AXES = ("data", "fsdp", "model")  # mesh axes each expert's model dim C is split over
GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x_AxK, w_GxKxN, sizes_G)


class MoEStats(NamedTuple):
  """Per-layer routing statistics, outputs of the layer scan (leading axis: MoE layers)."""
  load: jax.Array  # (E,) token-expert assignments per expert in the global batch.
  balance_rate: jax.Array  # () gamma, the step of the balancing bias.
  balance_loss: jax.Array  # () weighted sequence-wise balance loss (0 when its weight is 0).
  dropped: jax.Array  # () fraction of assignments no expert computed (0 by construction).


def route(x_TxC: jax.Array, router_CxE: jax.Array, bias_E: jax.Array, k: int
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(expert_TxK, gate_TxK, affinity_TxE)`: top-k by affinity + bias, gates by affinity only."""
  affinity_TxE = jax.nn.sigmoid(x_TxC.astype(jnp.float32) @ router_CxE)
  _, expert_TxK = jax.lax.top_k(affinity_TxE + jax.lax.stop_gradient(bias_E), k)
  chosen_TxK = jnp.take_along_axis(affinity_TxE, expert_TxK, axis=-1)
  return expert_TxK, chosen_TxK / jnp.sum(chosen_TxK, -1, keepdims=True), affinity_TxE


def grouped_swiglu(x_AxC: jax.Array, group_sizes_E: jax.Array, w_in_ExCx2F: jax.Array,
                   w_out_ExFxC: jax.Array, matmul: GroupedMatmul = grouped_matmul) -> jax.Array:
  """SwiGLU of rows sorted by expert, `group_sizes_E[e]` rows for expert `e`; rows past
  `sum(group_sizes_E)` come out as zeros. `matmul`: a `grouped_matmul` (default: ragged_dot)."""
  f = w_out_ExFxC.shape[1]
  h_Ax2F = matmul(x_AxC, w_in_ExCx2F, group_sizes_E)
  h_AxF = nn.silu(h_Ax2F[:, :f]) * h_Ax2F[:, f:]
  return matmul(h_AxF, w_out_ExFxC, group_sizes_E)


def dispatch_local(x_TxC, expert_TxK, gate_TxK, w_in_ExCx2F, w_out_ExFxC,
                   matmul: GroupedMatmul = grouped_matmul) -> jax.Array:
  """`sum_k gate * FFN_expert(x)` per token with every expert on this device."""
  k = expert_TxK.shape[1]
  num_experts = w_in_ExCx2F.shape[0]
  order_A = jnp.argsort(expert_TxK.reshape(-1), stable=True)
  token_A = order_A // k
  sizes_E = jnp.zeros(num_experts, jnp.int32).at[expert_TxK.reshape(-1)].add(1)
  y_AxC = grouped_swiglu(x_TxC[token_A], sizes_E, w_in_ExCx2F, w_out_ExFxC, matmul)
  y_AxC = y_AxC * gate_TxK.reshape(-1)[order_A, None].astype(y_AxC.dtype)
  return jnp.zeros_like(x_TxC).at[token_A].add(y_AxC)


def dispatch_expert_parallel(x_TxC, expert_TxK, gate_TxK, w_in_ExCx2F, w_out_ExFxC, *,
                             axis: str = EXPERT_AXIS, matmul: GroupedMatmul = grouped_matmul
                             ) -> tuple[jax.Array, jax.Array]:
  """`dispatch_local` inside `shard_map` with this device's slice of the experts.

  Each device sorts its token-expert assignments by expert and sends device `d` the rows for
  `d`'s experts through one `all_to_all`. Buffers hold all `T * k` local assignments per peer, so
  nothing is dropped at any load (the price: buffers `num_shards` times the routed rows).
  `ragged_all_to_all` would send only the routed rows but XLA:CPU does not implement it, and the
  tests run here. Returns `(out_TxC, rows_computed)`: how many assignments this device's experts
  computed (summed over devices, it shows that none was dropped).
  """
  t, k = expert_TxK.shape
  a = t * k
  num_shards = jax.lax.axis_size(axis)
  local_experts = w_in_ExCx2F.shape[0]
  order_A = jnp.argsort(expert_TxK.reshape(-1), stable=True)
  expert_A = expert_TxK.reshape(-1)[order_A]
  token_A = order_A // k
  dest_A = expert_A // local_experts
  count_D = jnp.zeros(num_shards, jnp.int32).at[dest_A].add(1)
  slot_A = jnp.arange(a) - (jnp.cumsum(count_D) - count_D)[dest_A]
  send_DxAxC = jnp.zeros((num_shards, a, x_TxC.shape[-1]), x_TxC.dtype)
  send_DxAxC = send_DxAxC.at[dest_A, slot_A].set(x_TxC[token_A])
  # Empty slots carry the sentinel `local_experts`, which sorts after every real expert.
  send_e_DxA = jnp.full((num_shards, a), local_experts, jnp.int32)
  send_e_DxA = send_e_DxA.at[dest_A, slot_A].set(expert_A % local_experts)

  recv_x = jax.lax.all_to_all(send_DxAxC, axis, 0, 0).reshape(num_shards * a, -1)
  recv_e = jax.lax.all_to_all(send_e_DxA, axis, 0, 0).reshape(-1)
  order_R = jnp.argsort(recv_e, stable=True)
  sizes_E = jnp.zeros(local_experts + 1, jnp.int32).at[recv_e].add(1)[:local_experts]
  y_sorted = grouped_swiglu(recv_x[order_R], sizes_E, w_in_ExCx2F, w_out_ExFxC, matmul)
  y_RxC = jnp.zeros_like(y_sorted).at[order_R].set(y_sorted)
  back_DxAxC = jax.lax.all_to_all(y_RxC.reshape(num_shards, a, -1), axis, 0, 0)

  y_AxC = back_DxAxC[dest_A, slot_A] * gate_TxK.reshape(-1)[order_A, None].astype(x_TxC.dtype)
  return jnp.zeros_like(x_TxC).at[token_A].add(y_AxC), jnp.sum(sizes_E)


def sequence_balance_loss(expert_BxSxK: jax.Array, affinity_BxSxE: jax.Array) -> jax.Array:
  """DeepSeek-V3's sequence-wise balance loss `sum_e f_e P_e`, averaged over sequences.

  `f_e = E / (k S) * #{tokens of the sequence routed to e}`, `P_e` = mean over the sequence of
  the affinities normalised over all experts. Equals 1 when the load is perfectly uniform.
  """
  _, s, k = expert_BxSxK.shape
  e = affinity_BxSxE.shape[-1]
  hits_BxE = jnp.sum(jax.nn.one_hot(expert_BxSxK, e, dtype=jnp.float32), axis=(1, 2))
  f_BxE = hits_BxE * e / (k * s)
  p_BxE = jnp.mean(affinity_BxSxE / jnp.sum(affinity_BxSxE, -1, keepdims=True), axis=1)
  return jnp.mean(jnp.sum(f_BxE * p_BxE, axis=-1))


class MoE(nn.Module):
  """Routed SwiGLU experts plus shared experts; returns `(y_BxSxC, MoEStats)`.

  With a multi-device `mesh` the dispatch runs per device inside `shard_map`: tokens stay where
  their batch rows are, experts are split over the `expert` axis (its size may be 1).
  """
  cfg: ModelConfig
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, u_BxSxC: jax.Array) -> tuple[jax.Array, MoEStats]:
    cfg, dt = self.cfg, self.cfg.activation_dtype
    b, s, c = u_BxSxC.shape
    e, f, k = cfg.num_experts, cfg.expert_dim, cfg.experts_per_token
    router_CxE = self.param("router", dense_init(c, ("embed", None)), (c, e))
    bias_E = self.param("balance_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                      (None,)), (e,))
    w_in_ExCx2F = self.param("experts_in", dense_init(c, ("exp", "exp_embed", None)),
                             (e, c, 2 * f))
    w_out_ExFxC = self.param("experts_out", dense_init(f, ("exp", None, "exp_embed")),
                             (e, f, c))

    expert_BxSxK, gate_BxSxK, affinity_BxSxE = route(u_BxSxC, router_CxE, bias_E, k)
    gate_BxSxK = gate_BxSxK * cfg.routed_scaling
    matmul = functools.partial(
        grouped_matmul, impl=platform.moe_impl(cfg.moe_impl, dims=(c, f), mesh=self.mesh),
        interpret=platform.interpret(self.mesh))
    # Init sees a one-row example batch; the parameters do not depend on the dispatch.
    if self.mesh is None or self.mesh.size == 1 or self.is_initializing():
      routed_TxC = dispatch_local(u_BxSxC.reshape(b * s, c), expert_BxSxK.reshape(b * s, k),
                                  gate_BxSxK.reshape(b * s, k), w_in_ExCx2F, w_out_ExFxC, matmul)
      routed_BxSxC, dropped = routed_TxC.reshape(b, s, c), jnp.zeros((), jnp.float32)
    else:
      routed_BxSxC, dropped = _shard_mapped_dispatch(self.mesh, matmul)(
          u_BxSxC, expert_BxSxK, gate_BxSxK, w_in_ExCx2F, w_out_ExFxC)

    y_BxSxC = routed_BxSxC
    if cfg.num_shared_experts:
      # Shared experts side by side are one SwiGLU of width num_shared * expert_dim.
      gate_up = nn.DenseGeneral((2, cfg.num_shared_experts * f), use_bias=False, dtype=dt,
                                name="shared_gate_up",
                                kernel_init=dense_init(c, ("embed", None, "mlp")))(u_BxSxC)
      hidden = nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
      y_BxSxC = y_BxSxC + nn.Dense(c, use_bias=False, dtype=dt, name="shared_down",
                                   kernel_init=dense_init(cfg.num_shared_experts * f,
                                                          ("mlp", "embed")))(hidden)

    load_E = jnp.zeros(e, jnp.float32).at[expert_BxSxK.reshape(-1)].add(1.0)
    balance = (cfg.balance_loss_weight * sequence_balance_loss(expert_BxSxK, affinity_BxSxE)
               if cfg.balance_loss_weight else jnp.zeros((), jnp.float32))
    stats = MoEStats(load=load_E, balance_rate=jnp.float32(cfg.balance_rate),
                     balance_loss=balance, dropped=dropped)
    return y_BxSxC.astype(dt), stats


def _shard_mapped_dispatch(mesh, matmul: GroupedMatmul):
  """`dispatch_expert_parallel` over the mesh: batch over `data` and `expert`, experts over
  `expert`. Each expert's weights are also split over `data` and `model` (ZeRO-3 style) and
  gathered just before use, so their gradients come back reduce-scattered."""
  batch = sharding.batch_axes(mesh)
  fsdp = tuple(a for a in EXPERT_FSDP_AXES if a in mesh.axis_names)

  def body(u_BxSxC, expert_BxSxK, gate_BxSxK, w_in, w_out):
    b, s, c = u_BxSxC.shape
    k = expert_BxSxK.shape[-1]
    w_in = jax.lax.all_gather(w_in, fsdp, axis=1, tiled=True)
    w_out = jax.lax.all_gather(w_out, fsdp, axis=2, tiled=True)
    out_TxC, computed = dispatch_expert_parallel(
        u_BxSxC.reshape(b * s, c), expert_BxSxK.reshape(b * s, k), gate_BxSxK.reshape(b * s, k),
        w_in, w_out, matmul=matmul)
    assigned = jax.lax.psum(b * s * k, batch)
    return out_TxC.reshape(b, s, c), 1.0 - jax.lax.psum(computed, batch) / assigned

  tokens = P(batch)
  return jax.shard_map(body, mesh=mesh,
                       in_specs=(tokens, tokens, tokens, P(EXPERT_AXIS, fsdp, None),
                                 P(EXPERT_AXIS, None, fsdp)),
                       out_specs=(tokens, P()), check_vma=False)


def bias_update(stats: MoEStats) -> jax.Array:
  """`gamma * sign(mean_load - load)` per layer and expert: up for the under-loaded experts."""
  load_LxE = stats.load
  return stats.balance_rate[..., None] * jnp.sign(jnp.mean(load_LxE, -1, keepdims=True) - load_LxE)


def load_metrics(stats: MoEStats) -> dict[str, jax.Array]:
  """Scalars for the metrics log: worst per-layer max/mean load, dropped fraction, balance loss."""
  load_LxE = stats.load
  return {
      "moe/load_max_over_mean": jnp.max(jnp.max(load_LxE, -1) / jnp.mean(load_LxE, -1)),
      "moe/dropped_fraction": jnp.max(stats.dropped),
      "moe/balance_loss": jnp.sum(stats.balance_loss),
  }
