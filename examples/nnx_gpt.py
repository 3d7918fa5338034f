"""A small GPT in Flax NNX, with mHC added in a handful of lines (each marked `# mHC`).

    python examples/nnx_gpt.py --connection=mhc --steps=100

Trains on the embedded corpus (the Python standard library's source, as bytes; built once and
cached) and prints the loss and the largest composite forward gain of the mixers (math.md §7).
`--connection=residual` runs the same code as a plain residual network (one stream).
"""

import argparse

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mhc_jax
import mhc_jax.nnx as mhc  # mHC
from mhc_jax.training.corpus import ensure_stdlib_corpus, load_split


class Block(nnx.Module):
  def __init__(self, d: int, heads: int, index: int, kind: str, n: int, *, rngs: nnx.Rngs):
    self.attn_norm, self.mlp_norm = nnx.RMSNorm(d, rngs=rngs), nnx.RMSNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
    self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)
    self.attn_conn = mhc.Connection(d, kind=kind, n=n, layer_index=2 * index, rngs=rngs)  # mHC
    self.mlp_conn = mhc.Connection(d, kind=kind, n=n, layer_index=2 * index + 1, rngs=rngs)  # mHC

  def __call__(self, x, mask):
    attn = lambda u: self.attn(self.attn_norm(u), mask=mask)
    mlp = lambda u: self.down(jax.nn.gelu(self.up(self.mlp_norm(u))))
    x, attn_coeffs = self.attn_conn(x, attn, return_coeffs=True)  # was: x = x + attn(x)  # mHC
    x, mlp_coeffs = self.mlp_conn(x, mlp, return_coeffs=True)  # was: x = x + mlp(x)  # mHC
    return x, [attn_coeffs.h_res, mlp_coeffs.h_res]


class GPT(nnx.Module):
  def __init__(self, vocab: int = 256, d: int = 64, heads: int = 4, layers: int = 4,
               kind: str = "mhc", n: int = 4, *, rngs: nnx.Rngs):
    self.n = n
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, heads, i, kind, n, rngs=rngs) for i in range(layers)])
    self.collapse = mhc.Collapse(d, n, rngs=rngs)  # mHC
    self.norm, self.head = nnx.RMSNorm(d, rngs=rngs), nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens_BxS):
    mask = nnx.make_causal_mask(tokens_BxS)
    x = mhc.expand(self.embed(tokens_BxS), self.n)  # mHC
    h_res = []
    for block in self.blocks:
      x, h = block(x, mask)
      h_res += h
    return self.head(self.norm(self.collapse(x))), jnp.stack(h_res)  # mHC: collapse


@nnx.jit
def train_step(model, optimizer, batch_BxS1):
  def loss_fn(model):
    logits, h_res = model(batch_BxS1[:, :-1])
    labels = batch_BxS1[:, 1:]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), h_res

  (loss, h_res), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  gain = mhc_jax.layer_diagnostics(h_res)["composite_fwd_avg"].max()  # mHC: diagnostics
  return loss, gain


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--connection", default="mhc", choices=["residual", "hc", "mhc", "mhc_lite"])
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=64)
  args = parser.parse_args()

  tokens = load_split(ensure_stdlib_corpus(), "train")
  n = 1 if args.connection == "residual" else 4
  model = GPT(kind=args.connection, n=n, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
  rng = np.random.default_rng(0)
  for step in range(1, args.steps + 1):
    starts = rng.integers(0, len(tokens) - args.seq - 1, args.batch)
    batch = np.stack([tokens[s:s + args.seq + 1] for s in starts]).astype(np.int32)
    loss, gain = train_step(model, optimizer, jnp.asarray(batch))
    if step % 10 == 0 or step == args.steps:
      print(f"step {step}  loss {float(loss):.3f}  composite gain {float(gain):.3f}")


if __name__ == "__main__":
  main()
