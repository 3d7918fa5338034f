"""A one-page PNG report of a training run, from `<workdir>/metrics.jsonl`.

Panels: (a) train and eval loss; (b) Amax gains per connection layer at the last logged
diagnostics, as in the mHC paper's Fig. 3 and 7 (earlier diagnostics faint); (c) the largest gains
over training, the composite's smallest column sum and the Sinkhorn marginal error; (d) gradient
norm and learning rate. Solid gain curves are gains of the token-averaged `H_res`; dotted ones are
the mean over tokens of per-token gains (math.md §7).
"""

import os
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter
import numpy as np

from mhc_jax.training.metrics import read_metrics, run_config_field

GAIN_SERIES = (  # (key suffix, label, color)
    ("single_fwd", "single-layer forward", "tab:blue"),
    ("single_bwd", "single-layer backward", "tab:orange"),
    ("composite_fwd", "composite forward", "tab:green"),
    ("composite_bwd", "composite backward", "tab:red"),
)
NUM_FAINT_STEPS = 4  # earlier diagnostics drawn faintly in panel (b)
NO_DIAGNOSTICS = "no Amax diagnostics in metrics.jsonl\n(a residual connection has every gain = 1)"


def _title(workdir: Path) -> str:
  fields = [(k, run_config_field(workdir, k))
            for k in ("connection", "n_streams", "num_layers", "d_model")]
  fields = ", ".join(f"{k}={v}" for k, v in fields if v is not None)
  return workdir.resolve().name + (f" — {fields}" if fields else "")


def _series(records: list[dict], key: str, reduce=None) -> tuple[np.ndarray, np.ndarray]:
  """`(steps, values)` of the records holding `key`; list values are reduced with `reduce`."""
  pairs = [(r["step"], reduce(r[key]) if reduce else r[key]) for r in records
           if r.get(key) not in (None, [])]
  if not pairs:
    return np.zeros((0,)), np.zeros((0,))
  steps, values = zip(*pairs)
  return np.asarray(steps), np.asarray(values, np.float64)


def plain_gain_axis(ax, log: bool = False) -> None:
  """The y axis reads as plain numbers: no offset ("1e-6+9.99e-1") or power notation.

  A linear axis spans at least 0.1, so gains that all sit at 1 +- 1e-6 show as 1.
  """
  if log:
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    # Minor ticks are labelled only when the axis spans less than about one decade.
    ax.yaxis.set_minor_formatter(plain if hi < 20 * lo else NullFormatter())
    return
  lo, hi = ax.get_ylim()
  mid = (lo + hi) / 2
  ax.set_ylim(min(lo, mid - 0.05), max(hi, mid + 0.05))
  ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def _log_if_wide(ax, values: list[np.ndarray]) -> None:
  """Log y scale when the positive values span more than a factor of 10; plain labels either way."""
  flat = np.concatenate([np.ravel(v) for v in values])
  positive = flat[np.isfinite(flat) & (flat > 0)]
  plain_gain_axis(ax, log=bool(positive.size and positive.max() > 10 * positive.min()))


def _no_data(ax, text: str) -> None:
  ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="gray",
          wrap=True)


def _no_gains(ax) -> None:
  """Gain panel of a run without diagnostics: the identity's gain of 1, and why."""
  ax.set_ylim(0, 2)
  ax.text(0.5, 0.75, NO_DIAGNOSTICS, transform=ax.transAxes, ha="center", va="center",
          color="gray")


def _plot_loss(ax, records: list[dict]) -> None:
  for key, style in (("train_loss", dict(lw=1.2)), ("eval_loss", dict(marker="o", ms=4))):
    steps, values = _series(records, key)
    if steps.size:
      ax.plot(steps, values, label=key.replace("_", " "), **style)
  if ax.lines:
    ax.legend()
  else:
    _no_data(ax, "no train_loss or eval_loss logged")
  ax.set(title="(a) loss", xlabel="step", ylabel="cross-entropy (nats/token)")
  ax.grid(alpha=0.3)


def _plot_layer_gains(ax, records: list[dict]) -> None:
  diag = [r for r in records if any(f"diag/{s}_avg" in r for s, _, _ in GAIN_SERIES)]
  ax.set(title="(b) Amax gain per layer", ylabel="gain",
         xlabel="connection layer (attention, MLP alternate)")
  ax.grid(alpha=0.3)
  ax.axhline(1.0, color="black", lw=0.6, ls="--")
  if not diag:
    _no_gains(ax)
    return
  latest = diag[-1]
  earlier = diag[:-1][::max(1, len(diag[:-1]) // NUM_FAINT_STEPS)][-NUM_FAINT_STEPS:]
  plotted = []
  for suffix, label, color in GAIN_SERIES:
    lines = [(r[f"diag/{suffix}_avg"], dict(alpha=0.15, lw=1)) for r in earlier
             if f"diag/{suffix}_avg" in r]
    lines += [(latest[f"diag/{suffix}_{kind}"], style) for kind, style in (
        ("avg", dict(ls="-", marker="o", ms=3, label=label)), ("tok", dict(ls=":", alpha=0.8)))
              if f"diag/{suffix}_{kind}" in latest]
    for values, style in lines:
      ax.plot(range(len(values)), values, color=color, **style)
      plotted.append(values)
  _log_if_wide(ax, plotted)
  ax.set_title(f"(b) Amax gain per layer at step {latest['step']}")
  faint = f"\nfaint: steps {', '.join(str(r['step']) for r in earlier)}" if earlier else ""
  ax.legend(fontsize=8, title="solid: token-avg matrix, dotted: mean per token" + faint,
            title_fontsize=7, framealpha=0.9)


def _plot_gains_over_steps(ax, records: list[dict]) -> None:
  ax.set(title="(c) stability over training", xlabel="step", ylabel="max over layers")
  ax.grid(alpha=0.3)
  ax.axhline(1.0, color="black", lw=0.6, ls="--")
  plotted = []
  for suffix, label, color in GAIN_SERIES:
    steps, values = _series(records, f"diag/{suffix}_avg", np.max)
    if steps.size:
      ax.plot(steps, values, color=color, label=f"{label} gain",
              alpha=1.0 if suffix.startswith("composite") else 0.5)
      plotted.append(values)
  for key, label, reduce, style in (
      ("diag/composite_min_col_sum", "composite min column sum (min)", np.min,
       dict(color="tab:purple")),
      ("diag/marginal_err", "Sinkhorn marginal error", np.max, dict(color="gray", ls="--"))):
    steps, values = _series(records, key, reduce)
    if steps.size:
      ax.plot(steps, values, label=label, **style)
      plotted.append(values)
  if not plotted:
    _no_gains(ax)
    return
  _log_if_wide(ax, plotted)
  ax.legend(fontsize=8, framealpha=0.9)


def _plot_optimizer(ax, records: list[dict]) -> None:
  ax.set(title="(d) gradient norm and learning rate", xlabel="step")
  ax.grid(alpha=0.3)
  steps, values = _series(records, "grad_norm")
  if steps.size:
    ax.plot(steps, values, color="tab:blue", lw=1)
    ax.set_ylabel("grad norm", color="tab:blue")
    _log_if_wide(ax, [values])
  steps_lr, lr = _series(records, "lr")
  if steps_lr.size:
    twin = ax.twinx()
    twin.plot(steps_lr, lr, color="tab:gray", lw=1)
    twin.set_ylabel("learning rate", color="tab:gray")
  if not (steps.size or steps_lr.size):
    _no_data(ax, "no grad_norm or lr logged")


def write_report(workdir: str | os.PathLike, path: str | os.PathLike | None = None) -> str:
  """Writes the report PNG (default `<workdir>/report.png`) and returns its path."""
  workdir = Path(workdir)
  records = read_metrics(workdir)
  out = Path(path) if path is not None else workdir / "report.png"
  fig = Figure(figsize=(14, 9), layout="tight")  # Agg canvas; no pyplot global state.
  axes = fig.subplots(2, 2)
  _plot_loss(axes[0, 0], records)
  _plot_layer_gains(axes[0, 1], records)
  _plot_gains_over_steps(axes[1, 0], records)
  _plot_optimizer(axes[1, 1], records)
  last = records[-1]["step"] if records else "none"
  fig.suptitle(f"{_title(workdir)}  (last step {last})")
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100)
  return str(out)
