"""`mhc_jax.aot.hlo` on a hand-written compiled-HLO excerpt: what it charges and what not."""

from mhc_jax.aot import hlo

# A kernel reading one buffer through two bitcasts; a VMEM prefetch feeding a fusion; a fusion
# body (not charged: its instructions run inside the fusion); bookkeeping instructions.
HLO = """\
HloModule jit_train_step, entry_computation_layout={}

%fused_computation.1 (p0: f32[1024]) -> f32[1024] {
  %p0 = f32[1024]{0:T(1024)} parameter(0)
  ROOT %neg = f32[1024]{0:T(1024)} negate(%p0)
}

ENTRY %main.1 (param.0: bf16[64,512], param.1: f32[1024]) -> f32[1024] {
  %param.0 = bf16[64,512]{1,0:T(8,128)(2,1)} parameter(0)
  %param.1 = f32[1024]{0:T(1024)} parameter(1)
  %bitcast.1 = bf16[64,512]{1,0:T(8,128)(2,1)} bitcast(%param.0)
  %bitcast.2 = bf16[64,512]{1,0:T(8,128)(2,1)} bitcast(%param.0)
  %mhc_pre_mix_fwd.1 = bf16[64,128]{1,0:T(8,128)(2,1)} custom-call(%bitcast.1, %bitcast.2), custom_call_target="tpu_custom_call", metadata={op_name="jit(train_step)/jvp(DecoderLM)/blocks_3/shard_map/jit(pre_mix)/mhc_pre_mix_fwd/pallas_call"}
  %copy-start.1 = (f32[1024]{0:T(1024)S(1)}, f32[1024]{0:T(1024)}, u32[]{:S(2)}) copy-start(%param.1)
  %copy-done.1 = f32[1024]{0:T(1024)S(1)} copy-done(%copy-start.1)
  %fusion.1 = f32[1024]{0:T(1024)} fusion(%copy-done.1), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(train_step)/jvp(DecoderLM)/blocks_3/mlp/neg"}
  ROOT %tuple.1 = (f32[1024]{0:T(1024)}, bf16[64,128]{1,0:T(8,128)(2,1)}) tuple(%fusion.1, %mhc_pre_mix_fwd.1)
}
"""


def test_charges_hbm_operands_once_and_skips_vmem_and_bodies():
  ops = {op.opcode: op for op in hlo.traffic_by_op(HLO)}
  assert set(ops) == {"custom-call", "copy-start", "fusion:kLoop"}  # not the body's negate
  assert ops["custom-call"].hbm_bytes == 64 * 512 * 2 + 64 * 128 * 2  # one read through 2 bitcasts
  assert ops["copy-start"].hbm_bytes == 1024 * 4  # the HBM read; not the VMEM copy or context
  assert ops["fusion:kLoop"].hbm_bytes == 1024 * 4  # reads VMEM, writes HBM


def test_split_and_groups():
  ops = hlo.traffic_by_op(HLO)
  assert hlo.traffic_split(ops) == {"mhc": 64 * 640 * 2, "prefetch": 4096, "rest": 4096}
  groups = hlo.traffic_by_group(ops)
  assert groups["fusion:kLoop | jvp(DecoderLM)/blocks_i/mlp/neg"] == 4096  # layer index dropped
