"""The drop-in connections (`mhc_jax.linen`, `mhc_jax.nnx`) in a model that is not ours.

Each API: HC at init computes exactly what the residual network computes; the drop-in mHC
block equals `DecoderLM`'s block on the same parameters (forward and gradients); the kernels
equal XLA; it runs under jit, remat and a scan over layers; its parameter count is math.md's;
and the two APIs agree with each other.
"""

import dataclasses

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mhc_jax.linen as mlinen
import mhc_jax.nnx as mnnx
from mhc_jax import layer_diagnostics
from mhc_jax.model.config import ModelConfig
from mhc_jax.model.layers import Attention, RMSNorm, SwiGLU, rope_tables
from mhc_jax.model.stack import REMAT_POLICIES, Block
from tests import helpers

B, S = 2, 8
F32_EPS = float(jnp.finfo(jnp.float32).eps)
KINDS = [("residual", 1), ("hc", 4), ("mhc", 4), ("mhc_lite", 3)]


def _close(got, want, rel=64 * F32_EPS):
  """Equal to float32 rounding, relative to the largest value of `want`."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=rel * max(float(jnp.max(jnp.abs(w))), 1e-6))


def _sublayer(c, seed):
  """A sublayer with its own weights: `tanh(u W)`."""
  w = jax.random.normal(jax.random.key(seed), (c, c)) / np.sqrt(c)
  return lambda u: jnp.tanh(u @ w)


def _perturbed(params, seed=3, scale=0.5):
  """Random offsets on every parameter: at init the streams are replicas and the mixing is
  symmetric, which would hide a transposed or misplaced coefficient."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


def _set_nnx(module, params: dict):
  for name, value in params.items():
    getattr(module, name)[...] = value


# --- Linen and NNX models of the user's own, built from the drop-in pieces -----------------------

class LinenNet(nn.Module):
  """Embedding-free toy net: expand, `layers` connections around tanh-dense sublayers, collapse."""
  kind: str
  n: int
  layers: int = 3
  exit: str = "mean"
  impl: str = "xla"

  @nn.compact
  def __call__(self, x_BxSxC, return_coeffs=False):
    c = x_BxSxC.shape[-1]
    x = mlinen.expand(x_BxSxC, self.n)
    all_coeffs = []
    for i in range(self.layers):
      dense = nn.Dense(c, use_bias=False, name=f"dense_{i}")
      x, coeffs = mlinen.Connection(self.kind, self.n, impl=self.impl, name=f"conn_{i}")(
          x, lambda u: jnp.tanh(dense(u)), layer_index=i, return_coeffs=True)
      all_coeffs.append(coeffs)
    y = mlinen.Collapse(self.exit, name="exit")(x)
    return (y, all_coeffs) if return_coeffs else y


class NNXNet(nnx.Module):
  """`LinenNet` in NNX, with the same parameter names."""

  def __init__(self, c, kind, n, layers=3, exit="mean", impl="xla", *, rngs):
    self.n, self.layers = n, layers
    for i in range(layers):
      setattr(self, f"dense_{i}", nnx.Linear(c, c, use_bias=False, rngs=rngs))
      setattr(self, f"conn_{i}", mnnx.Connection(c, kind=kind, n=n, impl=impl, layer_index=i,
                                                 rngs=rngs))
    self.exit = mnnx.Collapse(c, n, mode=exit, rngs=rngs)

  def __call__(self, x_BxSxC):
    x = mnnx.expand(x_BxSxC, self.n)
    for i in range(self.layers):
      dense = getattr(self, f"dense_{i}")
      x = getattr(self, f"conn_{i}")(x, lambda u: jnp.tanh(dense(u)))
    return self.exit(x)


def _load_nnx(net: NNXNet, linen_params: dict):
  """Copies `LinenNet` parameters into `net`."""
  for name, tree in linen_params.items():
    if name.startswith("dense"):
      getattr(net, name).kernel[...] = tree["kernel"]
    else:
      _set_nnx(getattr(net, name), tree)


def _inputs(c=16, seed=0):
  return jax.random.normal(jax.random.key(seed), (B, S, c))


# --- HC at init is the residual network ----------------------------------------------------------

def test_hc_at_init_equals_the_residual_network_linen():
  x = _inputs()
  res_params = nn.meta.unbox(LinenNet("residual", 1).init(jax.random.key(0), x)["params"])
  hc_params = nn.meta.unbox(LinenNet("hc", 4).init(jax.random.key(1), x)["params"])
  for i in range(3):  # the same sublayer weights; HC's connection parameters stay at their init
    hc_params[f"dense_{i}"] = res_params[f"dense_{i}"]
  want = LinenNet("residual", 1).apply({"params": res_params}, x)
  got = LinenNet("hc", 4).apply({"params": hc_params}, x)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(hc_params["conn_1"]["static_pre"], [0, 1, 0, 0])


def test_hc_at_init_equals_the_residual_network_nnx():
  x = _inputs()
  residual, hc = NNXNet(16, "residual", 1, rngs=nnx.Rngs(0)), NNXNet(16, "hc", 4,
                                                                     rngs=nnx.Rngs(1))
  for i in range(3):
    getattr(hc, f"dense_{i}").kernel[...] = getattr(residual, f"dense_{i}").kernel[...]
  np.testing.assert_array_equal(hc(x), residual(x))
  np.testing.assert_array_equal(hc.conn_2.static_pre[...], [0, 0, 1, 0])


# --- The drop-in block is DecoderLM's block ------------------------------------------------------

def _decoder_block(kind, n):
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, connection=kind,
                    n_streams=n)
  sin, cos = rope_tables(S, cfg.rope_dim, cfg.rope_theta)
  streams = jax.random.normal(jax.random.key(1), (B, S, n, cfg.d_model))
  params = nn.meta.unbox(Block(cfg).init(jax.random.key(0), streams, 1, sin, cos)["params"])
  params = {k: _perturbed(v) if k.endswith("_conn") else v for k, v in params.items()}
  cot = jax.random.normal(jax.random.key(2), streams.shape)

  def block_loss(conn_params, streams):
    p = {**params, **conn_params}
    return jnp.sum(Block(cfg).apply({"params": p}, streams, 1, sin, cos)[0] * cot)

  def sublayers():  # the block's own sublayers, as plain functions of their inputs
    dt = cfg.activation_dtype
    norm = lambda name, u: RMSNorm(cfg.norm_eps, dt).apply({"params": params[name]}, u)
    return (lambda u: Attention(cfg).apply({"params": params["attn"]}, norm("attn_norm", u),
                                           sin, cos),
            lambda u: SwiGLU(cfg).apply({"params": params["mlp"]}, norm("mlp_norm", u)))

  conn_params = {k: params[k] for k in ("attn_conn", "mlp_conn")}
  return cfg, streams, conn_params, block_loss, sublayers(), cot


@pytest.mark.parametrize("kind,n", [("mhc", 4), ("hc", 4), ("mhc_lite", 3)])
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_dropin_block_equals_decoder_block(api, kind, n):
  cfg, streams, conn_params, block_loss, (attn, mlp), cot = _decoder_block(kind, n)
  spec = dataclasses.asdict(cfg.connection_spec)

  def dropin_loss(conn_params, streams):
    x = streams
    for k, (name, sublayer) in enumerate((("attn_conn", attn), ("mlp_conn", mlp))):
      if api == "linen":
        x = mlinen.Connection(**spec).apply({"params": conn_params[name]}, x, sublayer,
                                            layer_index=2 + k)
      else:
        conn = mnnx.Connection(cfg.d_model, **spec, layer_index=2 + k, rngs=nnx.Rngs(0))
        _set_nnx(conn, conn_params[name])
        x = conn(x, sublayer)
    return jnp.sum(x * cot)

  want_loss, want_grads = jax.value_and_grad(block_loss, (0, 1))(conn_params, streams)
  got_loss, got_grads = jax.value_and_grad(dropin_loss, (0, 1))(conn_params, streams)
  _close(got_loss, want_loss)
  _close(got_grads, want_grads)


# --- Kernels, jit, remat, scan -------------------------------------------------------------------

@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_pallas_equals_xla(api):
  """C = 128, the kernels' smallest width; interpret mode on the CPU."""
  x = _inputs(c=128)
  linen_params = _perturbed(nn.meta.unbox(
      LinenNet("mhc", 4, layers=2, exit="gated").init(jax.random.key(0), x)["params"]), scale=0.1)

  def loss(params, x, impl):
    if api == "linen":
      y = LinenNet("mhc", 4, layers=2, exit="gated", impl=impl).apply({"params": params}, x)
    else:
      net = NNXNet(128, "mhc", 4, layers=2, exit="gated", impl=impl, rngs=nnx.Rngs(0))
      _load_nnx(net, params)
      y = net(x)
    return jnp.sum(jnp.sin(y))

  want = jax.value_and_grad(loss, (0, 1))(linen_params, x, "xla")
  got = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)(linen_params, x, "pallas")
  _close(got, want, rel=256 * F32_EPS)


def test_pallas_runs_the_kernels():
  x = mnnx.expand(_inputs(c=128), 4)
  conn = mnnx.Connection(128, impl="pallas", rngs=nnx.Rngs(0))
  jaxpr = str(jax.make_jaxpr(lambda x: conn(x, jnp.tanh))(x))
  assert "mhc_post_res_mix" in jaxpr and "mhc_coefficients" in jaxpr, jaxpr[:2000]


def test_linen_remat_policy_and_scan_over_layers():
  """`nn.scan` over a block of the user's, under the paper's `mhc_block` remat policy, equals
  the Python loop of the same blocks."""

  class UserBlock(nn.Module):
    @nn.compact
    def __call__(self, x, i):
      dense = nn.Dense(x.shape[-1], use_bias=False)
      return mlinen.Connection("mhc", 4)(x, lambda u: jnp.tanh(dense(u)), layer_index=i), None

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      block = nn.remat(UserBlock, policy=REMAT_POLICIES["mhc_block"], prevent_cse=False)
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=0, length=3)(name="blocks")
      return stack(x, jnp.arange(3))[0]

  x = mlinen.expand(_inputs(), 4)
  params = _perturbed(nn.meta.unbox(Scanned().init(jax.random.key(0), x)["params"]), scale=0.1)
  assert params["blocks"]["Connection_0"]["phi"].shape == (3, 64, 24)

  def looped(params, x):
    for i in range(3):
      layer = jax.tree.map(lambda p: p[i], params["blocks"])
      x = UserBlock().apply({"params": layer}, x, i)[0]
    return jnp.sum(jnp.sin(x))

  scanned = lambda params, x: jnp.sum(jnp.sin(Scanned().apply({"params": params}, x)))
  _close(jax.jit(jax.grad(scanned, (0, 1)))(params, x), jax.grad(looped, (0, 1))(params, x))


def test_nnx_scan_over_layers_under_jit():
  """`nnx.vmap` builds a stack of connections (HC's init follows each layer's index) and
  `nnx.scan` runs it inside `nnx.jit`; it equals calling the layers one by one."""
  c, layers = 16, 4

  @nnx.vmap(in_axes=(0, 0))
  def make(index, key):
    return mnnx.Connection(c, kind="hc", n=4, layer_index=index, rngs=nnx.Rngs(key))

  stack = make(jnp.arange(layers), jax.random.split(jax.random.key(0), layers))
  np.testing.assert_array_equal(stack.static_pre[...], np.eye(4))
  sublayer = _sublayer(c, 1)

  @nnx.jit
  def scanned(stack, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(conn, x):
      return conn(x, sublayer)
    return body(stack, x)

  x = mnnx.expand(_inputs(), 4)
  want = x
  for i in range(layers):
    layer = mnnx.Connection(c, kind="hc", n=4, rngs=nnx.Rngs(0))
    _set_nnx(layer, {name: getattr(stack, name)[...][i] for name in stack.param_names})
    want = layer(want, sublayer)
  _close(scanned(stack, x), want)


def test_nnx_remat_keeps_values_and_gradients():
  """`nnx.remat` under the paper's `mhc_block` policy (the sublayer output is named
  `sublayer_out`) changes nothing but memory."""
  conn = mnnx.Connection(16, rngs=nnx.Rngs(0))
  _set_nnx(conn, _perturbed(nnx.to_pure_dict(nnx.state(conn)), scale=0.1))
  x, sublayer = mnnx.expand(_inputs(), 4), _sublayer(16, 1)
  loss = lambda conn, x: jnp.sum(jnp.sin(conn(x, sublayer)))
  remat_loss = nnx.remat(loss, policy=REMAT_POLICIES["mhc_block"])
  want = nnx.value_and_grad(loss, argnums=(0, 1))(conn, x)
  got = nnx.jit(nnx.value_and_grad(remat_loss, argnums=(0, 1)))(conn, x)
  _close(jax.tree.leaves(got), jax.tree.leaves(want))


# --- Parameters, diagnostics, the two APIs agree -------------------------------------------------

@pytest.mark.parametrize("kind,n", KINDS + [("mhc", 8)])
def test_parameter_count_is_math_md(kind, n):
  c = 32
  k = {"mhc": n * n + 2 * n, "mhc_lite": int(np.prod(range(1, n + 1))) + 2 * n}.get(kind, 0)
  want = {"residual": 0, "hc": n * n + 2 * n + 3 + c * (n + 3)}.get(kind, (n * c + 1) * k + 3)
  conn = mnnx.Connection(c, kind=kind, n=n, rngs=nnx.Rngs(0))
  got = sum(p.size for p in jax.tree.leaves(nnx.state(conn, nnx.Param)))
  linen = mlinen.Connection(kind, n).init(jax.random.key(0), mlinen.expand(_inputs(c), n),
                                          jnp.tanh)
  assert got == want == sum(p.size for p in jax.tree.leaves(nn.meta.unbox(linen)))


@pytest.mark.parametrize("kind,n", KINDS)
@pytest.mark.parametrize("exit", ["gated", "sum", "mean"])
def test_linen_and_nnx_agree(kind, n, exit):
  x = _inputs()
  linen_net = LinenNet(kind, n, exit=exit)
  params = _perturbed(nn.meta.unbox(linen_net.init(jax.random.key(0), x)["params"]))
  nnx_net = NNXNet(16, kind, n, exit=exit, rngs=nnx.Rngs(5))
  _load_nnx(nnx_net, params)
  _close(nnx_net(x), linen_net.apply({"params": params}, x))


def test_coefficients_feed_the_diagnostics():
  x = _inputs()
  net = LinenNet("mhc", 4, layers=5)
  params = net.init(jax.random.key(0), x)
  _, coeffs = net.apply(params, x, return_coeffs=True)
  diags = layer_diagnostics(jnp.stack([c.h_res for c in coeffs]))
  assert diags["composite_fwd_avg"].shape == (5,)
  np.testing.assert_allclose(diags["marginal_err"], 0.0, atol=1e-5)  # doubly stochastic
  np.testing.assert_allclose(diags["composite_fwd_avg"], 1.0, atol=1e-5)


# --- Bad arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    (dict(kind="mhx"), "kind"), (dict(n=0), "n"), (dict(kind="residual", n=4), "n"),
    (dict(kind="mhc_lite", n=5), "n"), (dict(sinkhorn_iters=0), "sinkhorn_iters"),
    (dict(impl="cuda"), "impl"), (dict(eps=0.0), "eps")])
def test_bad_settings_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=rf"Connection: {name}="):
    mnnx.Connection(16, **kwargs, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=rf"Connection: {name}="):
    mlinen.Connection(**kwargs).init(jax.random.key(0), jnp.zeros((1, 2, kwargs.get("n", 4), 16)),
                                     jnp.tanh)


def test_bad_shapes_name_the_fix():
  conn = mnnx.Connection(16, n=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"expand\(x, n=4\)"):
    conn(_inputs(), jnp.tanh)  # (B, S, C): not expanded
  with pytest.raises(ValueError, match="d_model=16"):
    conn(mnnx.expand(_inputs(c=8), 4), jnp.tanh)
  with pytest.raises(ValueError, match="sublayer must map"):
    conn(mnnx.expand(_inputs(), 4), lambda u: u[..., :4])
  with pytest.raises(ValueError, match="Collapse: mode="):
    mnnx.Collapse(16, 4, mode="max")
  with pytest.raises(ValueError, match="rngs"):
    mnnx.Collapse(16, 4)
  with pytest.raises(ValueError, match="expand: n="):
    mlinen.expand(_inputs(), 0)


def _mesh_child():
  """Two fake devices: the NNX connection's kernels run per device through shard_map and equal
  XLA on one device."""
  import json  # pylint: disable=g-import-not-at-top
  from mhc_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(2, 1)
  x = mnnx.expand(jax.random.normal(jax.random.key(0), (4, 8, 128)), 4)
  sublayer = _sublayer(128, 1)

  def loss(params, x, impl, mesh):
    conn = mnnx.Connection(128, impl=impl, mesh=mesh, rngs=nnx.Rngs(0))
    _set_nnx(conn, params)
    return jnp.sum(jnp.sin(conn(x, sublayer)))

  params = _perturbed(dict(nnx.to_pure_dict(nnx.state(mnnx.Connection(128, rngs=nnx.Rngs(0))))))
  want = jax.value_and_grad(loss, (0, 1))(params, x, "xla", None)
  got = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=(2, 3))(params, x, "pallas", mesh)
  calls = str(jax.make_jaxpr(lambda p, x: loss(p, x, "pallas", mesh))(params, x))
  errors = [float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
  print(json.dumps({"max_rel_error": max(errors), "shard_map": "shard_map" in calls}))


def test_pallas_on_a_mesh_equals_xla():
  out = helpers.run_with_devices("tests.test_dropin:_mesh_child", 2)
  assert out["shard_map"]
  assert out["max_rel_error"] < 256 * F32_EPS, out
