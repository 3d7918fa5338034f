"""The one choice point per platform: which attention, grouped matmul and kernel backend run."""

import jax
import pytest

import kernels_pallas
from mhc_jax.parallel import platform


def test_attention_auto_follows_the_target_and_the_shapes():
  assert platform.attention_impl("auto", seq_len=4096, on="tpu") == "splash"
  assert platform.attention_impl("auto", seq_len=100, on="tpu") == "xla"  # splash: 128-multiples
  assert platform.attention_impl("auto", seq_len=4096, on="gpu") == "cudnn"
  assert platform.attention_impl("auto", seq_len=4096, dtype="float32", on="gpu") == "xla"
  assert platform.attention_impl("auto", seq_len=4096, on="cpu") == "xla"
  assert platform.attention_impl("splash", seq_len=4096, on="cpu") == "splash"
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    platform.attention_impl("flash", seq_len=4096, on="tpu")


def test_moe_auto_follows_the_platform_of_the_target():
  assert platform.moe_impl("auto", dims=(1280, 896), on="tpu") == "megablox"
  assert platform.moe_impl("auto", dims=(32, 896), on="tpu") == "ragged_dot"  # not lane-dense
  assert platform.moe_impl(on="gpu") == "ragged_dot"
  assert platform.moe_impl(on="cpu") == "ragged_dot"
  assert platform.moe_impl("megablox", on="cpu") == "megablox"
  with pytest.raises(ValueError, match="moe_impl='dense'"):
    platform.moe_impl("dense", on="tpu")


def test_without_a_mesh_the_host_decides():
  assert platform.platform(None) == jax.default_backend()
  assert platform.interpret(None) == (jax.default_backend() == "cpu")


@pytest.mark.parametrize("device_platform,backend", [("cpu", "interpret"), ("tpu", "tpu"),
                                                     ("gpu", "gpu"), ("cuda", "gpu")])
def test_kernel_backend_follows_the_mesh_devices(device_platform, backend, monkeypatch):
  class FakeDevice:
    platform = device_platform

  class FakeMesh:
    class devices:  # pylint: disable=invalid-name
      flat = [FakeDevice()]

  assert platform.kernel_block_sizes(FakeMesh()).backend == backend
  given = kernels_pallas.BlockSizes(mix_tokens=32)
  assert platform.kernel_block_sizes(FakeMesh(), given).mix_tokens == 32
  assert platform.kernel_block_sizes(FakeMesh(), given).backend == backend


def test_mhc_impl_names_the_field():
  with pytest.raises(ValueError, match="mhc_impl='cuda'"):
    platform.mhc_impl("cuda", connection="mhc", n_streams=4, d_model=128)
