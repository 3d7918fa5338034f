"""Compile-only builds of the train step for real targets: TPUs through libtpu (`.venv-tpu`), an
H100 through JAX's CUDA plugin (`.venv-cuda`).

`make test` creates `.venv-tpu`; `.venv-cuda` (4.5 GB) only `make cuda-venv` does, and the H100
tests skip, saying so, without it. Both run `launch.compile` in a subprocess so that the main
environment never loads libtpu or CUDA. Each test names its target, config and shape in its id.
"""

import json
from pathlib import Path
import subprocess
import sys

import pytest

from mhc_jax.aot import targets

REPO = Path(__file__).resolve().parents[1]
TPU_PYTHON = REPO / ".venv-tpu" / "bin" / "python"
CUDA_PYTHON = REPO / ".venv-cuda" / "bin" / "python"
needs_libtpu = pytest.mark.skipif(not TPU_PYTHON.exists(),
                                  reason="no .venv-tpu: `make tpu-venv` (make test creates it)")
needs_cuda_plugin = pytest.mark.skipif(not CUDA_PYTHON.exists(),
                                       reason="no .venv-cuda: `make cuda-venv` (4.5 GB) first")
SMOKE = "configs/default.py:smoke"


def _compile(python, *flags, timeout=600):
  return subprocess.run([str(python), "-m", "launch.compile", *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, check=False)


def _error_line(proc):
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  return lines[0]


@pytest.mark.parametrize("name,chips,topology", [
    ("v5e-4", 4, "v5e:2x2"), ("v6e-16", 16, "v6e:4x4"), ("v5p-8", 4, "v5p:2x2x1"),
    ("v5p-128", 64, "v5p:4x4x4")])
def test_target_names_follow_cloud_tpu(name, chips, topology):
  target = targets.parse_target(name)
  assert (target.chips, target.topology) == (chips, topology)


def test_unknown_target_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"--target='v5p-6' is unknown: use one of .*v5p-8"):
    targets.parse_target("v5p-6")


@pytest.mark.parametrize("target,install", [("v5e-4", "pip install 'jax[tpu]'"),
                                            ("h100", "pip install 'jax[cuda13]'")])
def test_missing_compiler_names_the_install_command(target, install):
  # The main environment has neither libtpu nor the CUDA plugin, on purpose.
  proc = _compile(sys.executable, f"--config={SMOKE}", f"--target={target}")
  assert install in _error_line(proc)


@needs_cuda_plugin
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_step_compiles_for_h100(tmp_path, dtype):
  """h100-mhc-smoke: XLA:GPU and ptxas really run; the memory figures come back. In bfloat16
  `attention_impl=auto` is cuDNN's flash attention (forward and backward); in float32, XLA's."""
  out = tmp_path / "compile.json"
  proc = _compile(CUDA_PYTHON, f"--config={SMOKE}", "--target=h100", f"--json={out}",
                  f"--config.model.dtype={dtype}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["chips"] == 1 and report["fits"] and report["per_device_bytes"]["total"] > 0
  assert report["hbm_bytes_per_step"] is None  # XLA:GPU has no cost analysis
  assert "compute only" in proc.stdout
  cudnn = {k for k in report["kernels"] if k.startswith("dot_product_attention")}
  assert len(cudnn) == (2 if dtype == "bfloat16" else 0), report["kernels"]


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("target,connection", [("v5e-4", "mhc"), ("v5p-8", "hc")],
                         ids=["v5e-4-mhc-smoke-float32", "v5p-8-hc-smoke-float32"])
def test_train_step_compiles_for_tpu(tmp_path, target, connection):
  out = tmp_path / "compile.json"
  proc = _compile(TPU_PYTHON, f"--config={SMOKE},{connection}", f"--target={target}",
                  f"--json={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  mem = report["per_device_bytes"]
  assert set(mem) == {"arguments", "outputs", "temp", "code", "total"}
  assert report["chips"] == 4 and report["fits"] and 0 < mem["total"] < report["hbm_bytes"]
  assert report["flops_per_step"] > 0 and report["hbm_bytes_per_step"] > 0
  assert 0 < report["mfu"] <= 1 and report["roofline_step_s"] > 0
  # Data parallel over 4 chips: the gradients are all-reduced.
  assert report["collectives"].get("all-reduce", 0) >= 1, report["collectives"]
  assert "fits" in proc.stdout and "roofline step time" in proc.stdout
  # The figures carry the compilers that made them.
  versions = report["versions"]
  assert {"python", "jax", "jaxlib", "libtpu"} <= set(versions), versions
  assert f"libtpu {versions['libtpu']}" in proc.stdout


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("config,layers", [("configs/default.py:hc", (1, 2)),
                                           ("configs/paper.py:tiny", (2, 3))],
                         ids=["v5e-4-default-hc-float32", "v5e-4-paper-tiny-moe-mla-float32"])
def test_analytic_flops_match_the_compiled_program(config, layers):
  """`mhc_jax.aot.flops` against XLA:TPU's own count for unrolled builds one block apart (for the
  MoE model, one MoE block after its dense block)."""
  script = f"""
import json
from configs.loader import load_config
from mhc_jax.aot import flops, targets
from mhc_jax.aot import compile_report as aot
from mhc_jax.model.config import ModelConfig
cfg = load_config("{config}")
devices = targets.compile_only_devices(targets.parse_target("v5e-4"))
xla = []
for layers in {layers}:
  c = cfg.copy_and_resolve_references()
  c.model.num_layers, c.model.scan_layers = layers, False
  # XLA's attention, whose FLOPs XLA counts itself; splash's are the kernel's own estimate,
  # which skips the masked blocks while flops.py counts the whole S x S.
  c.model.attention_impl = "xla"
  xla.append(aot.compile_train_step(c, devices).cost_analysis()["flops"] * len(devices))
  ours = flops.train_flops_per_step(ModelConfig.from_dict(c.model), c.seq_len, c.batch_size)
  xla.append(ours)
print(json.dumps(xla))
"""
  proc = subprocess.run([str(TPU_PYTHON), "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=600, check=False,
                        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  xla_1, ours_1, xla_2, ours_2 = json.loads(proc.stdout.strip().splitlines()[-1])
  # The per-block difference isolates one block's FLOPs from the head and the optimizer. XLA
  # also counts the elementwise ops (norms, softmax, tanh): 2% more at the default shape.
  expected = ours_2 - ours_1
  # The paper model's grouped matmuls are the megablox kernels here (a TPU target), which count
  # the routed rows only. (XLA's own `ragged_dot` counts its weight gradients densely over the
  # 16 experts of a chip: 2.7x this block's FLOPs; docs/paper_models.md.)
  assert expected == pytest.approx(xla_2 - xla_1, rel=0.05)


@needs_libtpu
@pytest.mark.slow
def test_expert_parallel_moe_compiles_for_v5p(tmp_path):
  """v5p-8-paper-tiny-bfloat16, mesh data 1 x expert 4: MoE + MLA + mHC through XLA:TPU, with
  the expert dispatch as all-to-alls and the grouped matmuls as the megablox kernels (the target,
  not this CPU host, picks them)."""
  out = tmp_path / "compile.json"
  proc = _compile(TPU_PYTHON, "--config=configs/paper.py:tiny", "--target=v5p-8",
                  "--config.mesh.expert=4", "--config.grad_accum_steps=2", "--config.batch_size=8",
                  f"--json={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["fits"] and report["hbm_bytes_per_step"] > 0
  assert report["collectives"].get("all-to-all", 0) >= 4, report["collectives"]
  # Forward: two gmm per MoE layer; backward: two gmm (input gradients) and two tgmm (weights).
  assert report["kernels"].get("gmm", 0) >= 4 and report["kernels"].get("tgmm", 0) >= 2, (
      report["kernels"])


@needs_libtpu
@pytest.mark.slow
def test_splash_attention_compiles_for_v5p_under_the_mesh(tmp_path):
  """v5p-8-smoke-seq256-float32: `attention_impl=auto` gives the TPU splash kernels, forward and
  backward, inside shard_map on the 4-chip data-parallel mesh."""
  out = tmp_path / "compile.json"
  proc = _compile(TPU_PYTHON, f"--config={SMOKE}", "--target=v5p-8", "--nobytes",
                  "--config.seq_len=256", "--config.model.d_model=128",
                  "--config.model.num_heads=1", f"--json={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  kernels = json.loads(out.read_text())["kernels"]
  for name in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
    assert any(k.startswith(name) for k in kernels), kernels


@needs_libtpu
@pytest.mark.slow
def test_pipeline_sends_overlap_compute_on_v5p(tmp_path):
  """v5p-8-smoke-8blocks-C256-seq256-bfloat16, mesh stage 4, GPipe with 4 microbatches: every
  stage-to-stage send, forward and backward, is an async collective-permute with compute
  scheduled between its start and its done (read from the compiled HLO)."""
  out = tmp_path / "compile.json"
  proc = _compile(TPU_PYTHON, f"--config={SMOKE}", "--target=v5p-8", "--nobytes",
                  "--config.model.num_layers=8", "--config.model.d_model=256",
                  "--config.seq_len=256", "--config.batch_size=8", "--config.model.dtype=bfloat16",
                  "--config.mesh.stage=4",
                  "--config.pipeline.microbatches=4", f"--json={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["pipeline"].startswith("pipeline: 4 stages") and "bubble 42.9%" in report["pipeline"]
  sends = report["pipeline_sends"]
  assert len(sends) >= 2 and min(sends) >= 1, sends  # forward and backward; none synchronous


@needs_libtpu
@pytest.mark.slow
def test_out_of_memory_is_reported_not_raised(tmp_path):
  """v5e-4-smoke-seq8192-float32: XLA:TPU refuses the program; the report says by how much."""
  out = tmp_path / "compile.json"
  proc = _compile(TPU_PYTHON, f"--config={SMOKE}", "--target=v5e-4", "--config.batch_size=256",
                  "--config.seq_len=8192", "--nobytes", f"--json={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert not report["fits"] and report["out_of_memory"]
  assert report["per_device_bytes"]["temp"] > report["hbm_bytes"]
  assert "refused by the compiler for memory" in proc.stdout and "short by" in proc.stdout


@needs_libtpu
def test_mesh_axes_that_split_the_torus_are_built():
  """v5p-128 is a 4x4x4 torus: an 8-wide axis must split a physical axis (jax.make_mesh refuses)."""
  script = """
from mhc_jax.aot import targets
from mhc_jax.parallel import sharding
devices = targets.compile_only_devices(targets.parse_target("v5p-128"))
print(dict(sharding.make_mesh(-1, 1, devices, expert=8).shape))
"""
  proc = subprocess.run([str(TPU_PYTHON), "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=False,
                        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == (
      "{'stage': 1, 'data': 8, 'fsdp': 1, 'expert': 8, 'model': 1}")


@needs_libtpu
def test_mesh_that_does_not_match_the_chips_is_refused():
  proc = _compile(TPU_PYTHON, f"--config={SMOKE}", "--target=v5e-4", "--config.mesh.data=8")
  assert "does not match the 4 chips of --target=v5e-4" in _error_line(proc)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2], ids=["mesh-data4", "mesh-stage2-data2"])
def test_pallas_train_step_compiles_for_v5p_without_stream_relayouts(tmp_path, stage):
  """v5p-8-mhc-pallas-4blocks-C256-seq512-bfloat16: the model runs the kernels (Mosaic, not the
  host's interpreter) per chip under shard_map, also nested in 2 pipeline stages of 2 blocks
  (with splash attention, `auto` on TPU), and the compiled HLO has no copy, transpose or reshape
  of the streams before or after any of them."""
  out = tmp_path / "compile.json"
  proc = _compile(TPU_PYTHON, f"--config={SMOKE},mhc", "--target=v5p-8", "--nobytes",
                  "--config.model.mhc_impl=pallas", "--config.model.d_model=256",
                  "--config.seq_len=512", "--config.batch_size=8",
                  "--config.model.dtype=bfloat16", f"--config.mesh.stage={stage}",
                  "--config.pipeline.microbatches=2", f"--json={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert (report.get("pipeline") or "").startswith("pipeline: 2 stages") == (stage == 2)
  kernels = report["kernels"]
  for name in ("mhc_coefficients_fwd", "mhc_coefficients_bwd", "mhc_pre_mix_fwd",
               "mhc_pre_mix_bwd", "mhc_post_res_mix_fwd", "mhc_post_res_mix_bwd"):
    assert kernels.get(name, 0) >= 1, kernels  # 4 blocks x 2 sublayers, scanned: >= 1 each
  assert any(k.startswith("splash_mha_fwd") for k in kernels), kernels
  assert report["stream_relayouts"] == [], report["stream_relayouts"]
  assert report["fits"]


def _kernel_matrix(python, targets_csv, out):
  return subprocess.run([str(python), "-m", "launch.compile_kernels", f"--targets={targets_csv}",
                         "--subset=ci", f"--json={out}"], cwd=REPO, capture_output=True,
                        text=True, timeout=900, check=False)


def _check_kernel_matrix(proc, out, targets_list):
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = json.loads(out.read_text())
  # Every kernel, direction and dtype, on every target; no relayout next to any kernel.
  assert {(r["target"], r["kernel"], r["direction"]) for r in rows} == {
      (t, k, d) for t in targets_list for k in ("coefficients", "pre_mix", "post_res_mix")
      for d in ("fwd", "vjp")}
  assert {r["dtype"] for r in rows} == {"bfloat16", "float32"}
  assert all(r["ok"] and r["relayouts"] == [] for r in rows), rows
  return rows


@needs_libtpu
@pytest.mark.slow
def test_kernels_compile_for_tpu(tmp_path):
  """v5e-4, v5p-8 and v6e-4 (Mosaic), 4 x 4096 tokens: each kernel forward and VJP once per
  target, bfloat16 and float32 alternating, n in {2, 4, 8} and C in {128, 1280, 2560} rotating
  (`launch.compile_kernels --subset=ci`; each case's target, dtype and shape is in its row)."""
  out = tmp_path / "kernels.json"
  rows = _check_kernel_matrix(_kernel_matrix(TPU_PYTHON, "v5e-4,v5p-8,v6e-4", out), out,
                              ["v5e-4", "v5p-8", "v6e-4"])
  assert {(r["kernel"], r["direction"], r["dtype"]) for r in rows} == {
      (k, d, t) for k in ("coefficients", "pre_mix", "post_res_mix") for d in ("fwd", "vjp")
      for t in ("bfloat16", "float32")}


@needs_cuda_plugin
@pytest.mark.slow
def test_kernels_compile_for_h100(tmp_path):
  """h100 (Triton, ptxas), 4 x 4096 tokens: each kernel forward and VJP once, as above; the
  coefficient kernels' loops stay loops, so each builds in seconds."""
  out = tmp_path / "kernels.json"
  _check_kernel_matrix(_kernel_matrix(CUDA_PYTHON, "h100", out), out, ["h100"])



# A compiled-HLO excerpt: a stream tensor (4096 x 512 elements) copied into token rows before a
# kernel, and an MoE-style gather of the kernel's `dy` by expert after it (a bigger array, in a
# fusion whose root is a reshape: not the streams).
_KERNEL_HLO = """\
%fused_gather (p0: bf16[4096,128], p1: s32[32768]) -> bf16[32768,128] {
  %p0 = bf16[4096,128]{1,0:T(8,128)(2,1)} parameter(0)
  %p1 = s32[32768]{0:T(1024)} parameter(1)
  %g = bf16[32768,1,128]{2,1,0:T(8,128)(2,1)} gather(%p0, %p1), offset_dims={2}
  ROOT %r = bf16[32768,128]{1,0:T(8,128)(2,1)} reshape(%g)
}

ENTRY %main.1 (param.0: bf16[4096,4,128], param.1: s32[32768]) -> bf16[32768,128] {
  %param.0 = bf16[4096,4,128]{2,1,0:T(4,128)(2,1)} parameter(0)
  %param.1 = s32[32768]{0:T(1024)} parameter(1)
  %copy.7 = bf16[4096,4,128]{2,0,1:T(8,128)(2,1)} copy(%param.0)
  %bitcast.1 = bf16[4096,512]{1,0:T(8,128)(2,1)} bitcast(%copy.7)
  %mhc_post_res_mix_bwd.2 = (bf16[4096,512]{1,0:T(8,128)(2,1)}, bf16[4096,128]{1,0:T(8,128)(2,1)}) custom-call(%bitcast.1), custom_call_target="tpu_custom_call"
  %get-tuple-element.3 = bf16[4096,128]{1,0:T(8,128)(2,1)} get-tuple-element(%mhc_post_res_mix_bwd.2), index=1
  ROOT %gather_fusion.4 = bf16[32768,128]{1,0:T(8,128)(2,1)} fusion(%get-tuple-element.3, %param.1), kind=kCustom, calls=%fused_gather
}
"""


def test_relayout_detector_flags_stream_copies_only():
  from mhc_jax.aot import hlo  # pylint: disable=g-import-not-at-top
  assert hlo.kernel_relayouts(_KERNEL_HLO, 4096 * 512) == ["mhc_post_res_mix_bwd.2 <- copy.7"]
  assert hlo.kernel_relayouts(_KERNEL_HLO.replace("copy(%param.0)", "add(%param.0, %param.0)"),
                              4096 * 512) == []
