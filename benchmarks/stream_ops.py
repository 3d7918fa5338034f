"""Forward + VJP time of the mHC ops with hand-written VJPs vs plain autodiff of the same math.

  python -m benchmarks.stream_ops --tokens=2048 --n=4 --c=512

Each pair is timed in the same run (medians, interleaved) and reported as autodiff / custom.
"""

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from mhc_jax.core import coefficients, sinkhorn, streams

_TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens (batch x sequence).")
_N = flags.DEFINE_integer("n", 4, "Streams.")
_C = flags.DEFINE_integer("c", 512, "Width of a stream.")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed calls per function.")


def _autodiff_sinkhorn(logits, num_iters=20, eps=1e-6):
  m = jax.nn.softmax(logits, axis=-2) + eps
  m = m / (jnp.sum(m, -1, keepdims=True) + eps)
  for _ in range(num_iters - 1):
    m = m / (jnp.sum(m, -2, keepdims=True) + eps)
    m = m / (jnp.sum(m, -1, keepdims=True) + eps)
  return m


def _autodiff_pre(x, h_pre):
  return jnp.sum(h_pre[..., :, None] * x, axis=-2)


def _autodiff_post(x, y, h_post, h_res):
  return jnp.sum(h_res[..., :, :, None] * x[..., None, :, :], axis=-2) + h_post[..., None] * y[
      ..., None, :]


def _autodiff_project(x, phi):
  return jnp.dot(x.reshape(x.shape[0], -1), phi, precision=jax.lax.Precision.HIGHEST)


def _fwd_vjp(fn, cotangent):
  """A jitted function returning the VJP of `fn` at its arguments for a fixed cotangent."""
  return jax.jit(lambda *args: jax.vjp(fn, *args)[1](cotangent))


def _median_times(fns, args, repeats):
  for f in fns:
    jax.block_until_ready(f(*args))
  times = [[] for _ in fns]
  for _ in range(repeats):
    for f, t in zip(fns, times):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      t.append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]


def main(argv):
  del argv
  t, n, c = _TOKENS.value, _N.value, _C.value
  k = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(k[0], (t, n, c))
  y = jax.random.normal(k[1], (t, c))
  h_vec = jax.random.uniform(k[2], (t, n))
  h_mat = jax.random.uniform(k[3], (t, n, n))
  phi = jax.random.normal(k[4], (n * c, coefficients.num_logits(n))) / (n * c) ** 0.5
  cases = [
      ("post_res_mix", streams.post_res_mix, _autodiff_post, (x, y, h_vec, h_mat), x),
      ("pre_mix", streams.pre_mix, _autodiff_pre, (x, h_vec), y),
      ("sinkhorn_knopp", sinkhorn.sinkhorn_knopp, _autodiff_sinkhorn, (3 * h_mat,), h_mat),
      ("project (phi)", coefficients.project, _autodiff_project, (x, phi),
       jnp.ones((t, coefficients.num_logits(n)))),
  ]
  print(f"devices={jax.devices()} tokens={t} n={n} C={c}: forward+VJP medians")
  for name, custom, autodiff, args, cotangent in cases:
    mine, plain = _median_times([_fwd_vjp(custom, cotangent), _fwd_vjp(autodiff, cotangent)],
                                args, _REPEATS.value)
    print(f"{name:15s} custom {mine * 1e3:7.2f} ms  autodiff {plain * 1e3:7.2f} ms  "
          f"autodiff/custom {plain / mine:5.2f}x", flush=True)


if __name__ == "__main__":
  app.run(main)
