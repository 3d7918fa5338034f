"""A small GPT in Flax Linen, with mHC added in a handful of lines (each marked `# mHC`).

    python examples/linen_gpt.py --connection=mhc --steps=100

The Linen twin of `nnx_gpt.py`: the same model, data and printout. Its blocks run under
`nn.scan` (parameters stacked over layers), as large models do.
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mhc_jax
import mhc_jax.linen as mhc  # mHC
from mhc_jax.training.corpus import ensure_stdlib_corpus, load_split


class Block(nn.Module):
  heads: int
  kind: str
  n: int

  @nn.compact
  def __call__(self, x, index):
    d = x.shape[-1]
    attn_norm, mlp_norm = nn.RMSNorm(name="attn_norm"), nn.RMSNorm(name="mlp_norm")
    attention = nn.MultiHeadDotProductAttention(self.heads, name="attn")
    up, down = nn.Dense(4 * d, name="up"), nn.Dense(d, name="down")
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    attn = lambda u: attention(attn_norm(u), mask=mask)
    mlp = lambda u: down(jax.nn.gelu(up(mlp_norm(u))))
    conn = lambda name: mhc.Connection(self.kind, self.n, name=name)  # mHC
    x, attn_coeffs = conn("attn_conn")(x, attn, layer_index=2 * index,  # was: x + attn(x)  # mHC
                                       return_coeffs=True)
    x, mlp_coeffs = conn("mlp_conn")(x, mlp, layer_index=2 * index + 1,  # was: x + mlp(x)  # mHC
                                     return_coeffs=True)
    return x, jnp.stack([attn_coeffs.h_res, mlp_coeffs.h_res])


class GPT(nn.Module):
  vocab: int = 256
  d: int = 64
  heads: int = 4
  layers: int = 4
  kind: str = "mhc"
  n: int = 4

  @nn.compact
  def __call__(self, tokens_BxS):
    x = mhc.expand(nn.Embed(self.vocab, self.d)(tokens_BxS), self.n)  # mHC
    blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=0, length=self.layers)(self.heads, self.kind, self.n, name="blocks")
    x, h_res_Lx2 = blocks(x, jnp.arange(self.layers))
    x = mhc.Collapse("gated")(x)  # mHC
    logits = nn.Dense(self.vocab)(nn.RMSNorm()(x))
    return logits, h_res_Lx2.reshape(-1, *h_res_Lx2.shape[2:])  # one per sublayer


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--connection", default="mhc", choices=["residual", "hc", "mhc", "mhc_lite"])
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=64)
  args = parser.parse_args()

  tokens = load_split(ensure_stdlib_corpus(), "train")
  model = GPT(kind=args.connection, n=1 if args.connection == "residual" else 4)
  params = model.init(jax.random.key(0), jnp.zeros((1, args.seq), jnp.int32))["params"]
  tx = optax.adamw(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, batch_BxS1):
    def loss_fn(params):
      logits, h_res = model.apply({"params": params}, batch_BxS1[:, :-1])
      labels = batch_BxS1[:, 1:]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), h_res

    (loss, h_res), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    gain = mhc_jax.layer_diagnostics(h_res)["composite_fwd_avg"].max()  # mHC: diagnostics
    return optax.apply_updates(params, updates), opt_state, loss, gain

  rng = np.random.default_rng(0)
  for step in range(1, args.steps + 1):
    starts = rng.integers(0, len(tokens) - args.seq - 1, args.batch)
    batch = np.stack([tokens[s:s + args.seq + 1] for s in starts]).astype(np.int32)
    params, opt_state, loss, gain = train_step(params, opt_state, jnp.asarray(batch))
    if step % 10 == 0 or step == args.steps:
      print(f"step {step}  loss {float(loss):.3f}  composite gain {float(gain):.3f}")


if __name__ == "__main__":
  main()
