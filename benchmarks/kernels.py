"""mHC kernels vs the XLA reference: forward and forward+backward time, bytes, bandwidth.

  python -m benchmarks.kernels            # paper shapes: 4 x 4096 tokens, n=4, C in {1280, 2560}
  python -m benchmarks.kernels --small    # quick CPU run
  python -m benchmarks.kernels --json out.json

Bandwidth is reported against a device copy of the streams timed in the same run. On CPU only the
XLA path is timed: Pallas runs in interpret mode there, and its timings mean nothing.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas
from mhc_jax.core import coefficients, streams

KW = dict(num_iters=20, eps=1e-6, post_scale=2.0)


def _time(fn, *args, reps):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def _ops(impl):
  """Forward ops of one mHC layer's connection work at `impl` ("xla" or "pallas")."""
  if impl == "xla":
    coef = lambda x, phi, a, b: coefficients.mhc_coefficients(x, phi, a, b, **KW)
    return coef, streams.pre_mix, streams.post_res_mix
  coef = lambda x, phi, a, b: kernels_pallas.mhc_coefficients(x, phi, a, b, **KW)
  return coef, kernels_pallas.pre_mix, kernels_pallas.post_res_mix


def _bytes(t, n, c, item, what):
  """Minimum HBM traffic (math.md §9) for the forward, or forward + backward."""
  k = n * n + 2 * n
  fwd = dict(coef=t * (n * c * item + 4 * k), pre=t * (n + 1) * c * item,
             post=t * (2 * n + 1) * c * item)[what]
  bwd = dict(coef=t * 2 * n * c * item + 4 * t * k, pre=t * (2 * n + 1) * c * item,
             post=t * (3 * n + 2) * c * item)[what]
  return fwd, fwd + bwd


def bench(batch, seq, n, c, dtype, impls, reps):
  ks = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(ks[0], (batch, seq, n, c), dtype)
  y = jax.random.normal(ks[1], (batch, seq, c), dtype)
  phi = jax.random.normal(ks[2], (n * c, n * n + 2 * n)) / np.sqrt(n * c)
  alpha, bias = jnp.full((3,), 0.01), jnp.zeros((n * n + 2 * n,))
  h_pre, h_post, h_res = coefficients.mhc_coefficients(x, phi, alpha, bias, **KW)
  copy_s = _time(jax.jit(lambda a: a * 1), x, reps=reps)  # read + write of the streams
  copy_bw = 2 * x.size * x.dtype.itemsize / copy_s
  t, item, rows = batch * seq, x.dtype.itemsize, []
  for impl in impls:
    coef, pre, post = _ops(impl)
    cases = dict(coef=(coef, (x, phi, alpha, bias)), pre=(pre, (x, h_pre)),
                 post=(post, (x, y, h_post, h_res)))
    for what, (fn, args) in cases.items():
      loss = lambda *a, fn=fn: sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(fn(*a)))
      grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
      for mode, f in (("fwd", jax.jit(fn)), ("fwd+bwd", grad)):
        secs = _time(f, *args, reps=reps)
        nbytes = _bytes(t, n, c, item, what)[mode == "fwd+bwd"]
        rows.append(dict(impl=impl, op=what, mode=mode, n=n, C=c, tokens=t, dtype=str(x.dtype),
                         ms=1e3 * secs, bytes=nbytes, gbps=nbytes / secs / 1e9,
                         frac_copy_bw=nbytes / secs / copy_bw, copy_gbps=copy_bw / 1e9))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="1 x 256 tokens, C=1280 only")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--json", help="write the rows to this path")
  args = parser.parse_args()
  on_cpu = jax.default_backend() == "cpu"
  impls = ("xla",) if on_cpu else ("xla", "pallas")
  if on_cpu:
    print("CPU backend: timing the XLA path only (Pallas interpret-mode timings are meaningless).")
  batch, seq, widths = (1, 256, (1280,)) if args.small else (4, 4096, (1280, 2560))
  rows = []
  for c in widths:
    rows += bench(batch, seq, 4, c, jnp.dtype(args.dtype), impls, args.reps)
  print(f"{'impl':7s} {'op':5s} {'mode':8s} {'C':>5s} {'ms':>9s} {'MB':>8s} {'GB/s':>8s} {'copy%':>6s}")
  for r in rows:
    print(f"{r['impl']:7s} {r['op']:5s} {r['mode']:8s} {r['C']:5d} {r['ms']:9.3f} "
          f"{r['bytes'] / 1e6:8.1f} {r['gbps']:8.1f} {100 * r['frac_copy_bw']:5.0f}%")
  print(f"device copy bandwidth: {rows[0]['copy_gbps']:.1f} GB/s ({jax.devices()[0].device_kind})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
