"""Causal attention without `S x S` scores in memory: XLA, cuDNN flash attention, TPU splash.

`causal_attention(q, k, v, impl=..., mesh=...)` for q, k `(B, S, N|K, D)` and v `(B, S, K, V)`
with `K` dividing `N` (grouped-query attention), scale `1 / sqrt(D)`; the value width `V` may
differ from `D` (MLA). `model.attention_impl`:

- `xla`: XLA's attention; it materialises the `(B, N, S, S)` scores.
- `cudnn`: `jax.nn.dot_product_attention` with cuDNN's fused flash attention (NVIDIA GPUs).
- `splash`: the Pallas splash-attention kernel that ships with JAX for TPU
  (`jax.experimental.pallas.ops.tpu.splash_attention`), with its backward kernels. Mosaic kernels
  cannot be partitioned by XLA, so on a mesh it runs inside `shard_map` (nested in the
  pipeline's inside a stage): batch over the batch axes, heads over `model`. Needs `S` to be a
  multiple of 128; values narrower than the queries are zero-padded to their width (which
  changes no value). On CPU it is interpreted.
- `auto`: splash on TPU when `S` allows, cuDNN on GPU in bfloat16/float16, XLA elsewhere
  (`mhc_jax.parallel.platform.attention_impl`, from the devices the step is built for).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

from mhc_jax.parallel import platform, sharding

LANES = 128
_BLOCK = 512  # splash's query and key blocks (fewer when the sequence is shorter)
HEAD_MESH_AXIS = "model"


@functools.lru_cache(maxsize=16)
def _splash_kernel(heads: int, seq_len: int, interpret: bool):
  """A causal multi-head splash kernel for one sequence: `(N, S, D) x 3 -> (N, S, D)`."""
  block = min(_BLOCK, seq_len)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len))] * heads)
  # Cached across traces, so its mask arrays must be concrete: built inside a jit they would be
  # that trace's tracers, and the next jit to reuse the kernel would fail (leaked tracer).
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _splash_local(q_BxSxNxD, k_BxSxKxD, v_BxSxKxV, interpret: bool):
  """Splash on this device's batch rows and heads; GQA's key/value heads repeated to `N`, head
  widths zero-padded to `W`, the wider of the query and value widths."""
  _, s, n, d = q_BxSxNxD.shape
  v_width = v_BxSxKxV.shape[-1]
  if s % LANES:
    raise ValueError(f"model.attention_impl='splash' needs seq_len to be a multiple of {LANES} "
                     f"(got {s}); use model.attention_impl='auto'.")
  w = max(d, v_width)
  groups = n // k_BxSxKxD.shape[2]

  def heads_first(t_BxSxHxX, repeat):  # (B, N, S, W)
    t = jnp.repeat(t_BxSxHxX, repeat, axis=2) if repeat > 1 else t_BxSxHxX
    t = jnp.pad(t, ((0, 0), (0, 0), (0, 0), (0, w - t.shape[-1])))
    return jnp.swapaxes(t, 1, 2)

  q = heads_first(q_BxSxNxD * jnp.asarray(1 / np.sqrt(d), q_BxSxNxD.dtype), 1)
  kernel = _splash_kernel(n, s, interpret)
  out_BxNxSxW = jax.vmap(kernel)(q, heads_first(k_BxSxKxD, groups), heads_first(v_BxSxKxV, groups))
  return jnp.swapaxes(out_BxNxSxW[..., :v_width], 1, 2).astype(q_BxSxNxD.dtype)


def _xla(q_BxSxNxD, k_BxSxKxD, v_BxSxKxV):
  """XLA attention with the scores materialised; any value width."""
  b, s, n, d = q_BxSxNxD.shape
  groups = n // k_BxSxKxD.shape[2]
  q_BxSxKxGxD = q_BxSxNxD.reshape(b, s, n // groups, groups, d)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q_BxSxKxGxD, k_BxSxKxD,
                      preferred_element_type=jnp.float32) / np.sqrt(d)
  scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxV.dtype)
  out = jnp.einsum("bkgqs,bskv->bqkgv", probs, v_BxSxKxV)
  return out.reshape(b, s, n, v_BxSxKxV.shape[-1])


def causal_attention(q_BxSxNxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
                     impl: str = "xla", mesh: jax.sharding.Mesh | None = None) -> jax.Array:
  """`(B, S, N, V)`: causal softmax attention by `impl` (resolved: not 'auto')."""
  if impl == "xla" and q_BxSxNxD.shape[-1] == v_BxSxKxD.shape[-1]:
    return jax.nn.dot_product_attention(q_BxSxNxD, k_BxSxKxD, v_BxSxKxD, is_causal=True,
                                        implementation="xla")
  if impl == "xla":  # unequal widths (MLA), which jax.nn.dot_product_attention does not take
    return _xla(q_BxSxNxD, k_BxSxKxD, v_BxSxKxD)
  if impl == "cudnn":  # cuDNN wants one head width: pad the values', drop the padding after
    d, v_width = q_BxSxNxD.shape[-1], v_BxSxKxD.shape[-1]
    v = jnp.pad(v_BxSxKxD, ((0, 0),) * 3 + ((0, max(d - v_width, 0)),))
    return jax.nn.dot_product_attention(q_BxSxNxD, k_BxSxKxD, v, is_causal=True,
                                        implementation="cudnn")[..., :v_width]
  if impl != "splash":
    raise ValueError(f"causal_attention impl={impl!r}; resolve 'auto' with "
                     "platform.attention_impl first.")
  local = functools.partial(_splash_local, interpret=platform.interpret(mesh))
  if mesh is None or mesh.size == 1:
    return local(q_BxSxNxD, k_BxSxKxD, v_BxSxKxD)
  batch = sharding.batch_axes(mesh)
  heads = HEAD_MESH_AXIS if HEAD_MESH_AXIS in mesh.axis_names else None
  spec = P(batch, None, heads, None)
  return platform.kernel_shard_map(local, mesh, (spec, spec, spec), spec)(q_BxSxNxD, k_BxSxKxD,
                                                                  v_BxSxKxD)
