"""The study's outputs: `summary.json`, a `README.md` table and `study.png` in the paper's style.

`study.png` panels: (a) single-layer and (b) composite forward Amax gain against layer index at
the end of training (paper Fig. 3); (c) the largest composite forward gain against step, log axis
(Fig. 7); (d) the eval-loss gap to residual; (e) gradient norm; (f) token-averaged `H_res`
heatmaps, single (last layer) and composite (the whole stack), for HC and mHC (Fig. 8). Gains are
those of the token-averaged matrices on the fixed diagnostics batch (`*_avg` in metrics.jsonl).
"""

import json
import os

from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec
import numpy as np

from mhc_jax.core.diagnostics import composite_forward
from mhc_jax.study import plan as study
from mhc_jax.training.metrics import read_metrics
from mhc_jax.training.report import plain_gain_axis

COLORS = {"residual": "tab:gray", "hc": "tab:red", "mhc": "tab:blue", "mhc_lite": "tab:green"}
HEATMAP_VARIANTS = ("hc", "mhc")


def _series(records, key, reduce=None):
  rows = [(r["step"], reduce(r[key]) if reduce else r[key]) for r in records if key in r]
  return (np.array([s for s, _ in rows]), np.array([v for _, v in rows], np.float64)) if rows \
      else (np.zeros(0), np.zeros(0))


def _fmt_list(v):
  return "[" + ", ".join(f"{x:.2f}" for x in v) + "]"


def _per_layer_panel(ax, runs_records, key, title):
  for variant, per_seed in runs_records.items():
    for k, records in enumerate(per_seed):
      diag = [r for r in records if key in r]
      if diag:
        ax.plot(diag[-1][key], color=COLORS[variant], marker="o", ms=3, alpha=1 if k == 0 else .4,
                label=variant if k == 0 else None)
  ax.axhline(1.0, color="black", lw=0.6, ls="--")
  ax.set(title=title, xlabel="connection layer", ylabel="Amax gain")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def _over_steps_panel(ax, runs_records, key, reduce, title, ylabel, baseline=None):
  for variant, per_seed in runs_records.items():
    for k, records in enumerate(per_seed):
      steps, values = _series(records, key, reduce)
      if baseline is not None:
        base_steps, base = _series(baseline[min(k, len(baseline) - 1)], key, reduce)
        common = np.intersect1d(steps, base_steps)
        values = values[np.isin(steps, common)] - base[np.isin(base_steps, common)]
        steps = common
      if steps.size:
        ax.plot(steps, values, color=COLORS[variant], alpha=1 if k == 0 else .4, lw=1.2,
                label=variant if k == 0 else None, marker="o" if steps.size < 20 else None, ms=3)
  ax.set(title=title, xlabel="step", ylabel=ylabel)
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=8)


def _heatmap(ax, m, title):
  lim = max(1.0, float(np.abs(m).max()))
  ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
  for (i, j), v in np.ndenumerate(m):
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
  ax.set_title(f"{title}\nrow sums {_fmt_list(m.sum(1))}\ncol sums {_fmt_list(m.sum(0))}",
               fontsize=8)
  ax.set_xticks([])
  ax.set_yticks([])


def write_figure(runs, path, h_res_by_variant):
  """Draws `study.png` from the runs' metrics and the first HC and mHC seeds' final `H_res`."""
  records = {}
  for run in runs:
    records.setdefault(run.variant, []).append(read_metrics(run.workdir))
  fig = Figure(figsize=(18, 14), layout="constrained")
  grid = GridSpec(3, 12, figure=fig)
  mixing = {v: r for v, r in records.items() if v != "residual"}
  ax = fig.add_subplot(grid[0, 0:4])
  _per_layer_panel(ax, mixing, "diag/single_fwd_avg", "(a) single-layer forward gain (Fig. 3)")
  plain_gain_axis(ax)
  ax = fig.add_subplot(grid[0, 4:8])
  _per_layer_panel(ax, mixing, "diag/composite_fwd_avg", "(b) composite forward gain (Fig. 3)")
  plain_gain_axis(ax, log=True)
  ax = fig.add_subplot(grid[0, 8:12])
  _over_steps_panel(ax, mixing, "diag/composite_fwd_avg", np.max,
                    "(c) max composite forward gain over training (Fig. 7)", "Amax gain")
  plain_gain_axis(ax, log=True)
  ax = fig.add_subplot(grid[1, 0:6])
  if "residual" in records:
    _over_steps_panel(ax, mixing, "eval_loss", None, "(d) eval loss minus residual's (same seed)",
                      "loss gap (nats/token)", baseline=records["residual"])
    ax.axhline(0.0, color="black", lw=0.6, ls="--")
  ax = fig.add_subplot(grid[1, 6:12])
  _over_steps_panel(ax, records, "grad_norm", None, "(e) gradient norm (before clipping)",
                    "global norm")
  plain_gain_axis(ax, log=True)
  for k, (variant, h_res) in enumerate(h_res_by_variant.items()):
    composite = np.asarray(composite_forward(h_res))[-1]
    for j, (m, what) in enumerate(((h_res[-1], "last layer H_res"),
                                   (composite, "composite H_L...H_1"))):
      _heatmap(fig.add_subplot(grid[2, 6 * k + 3 * j:6 * k + 3 * j + 3]), m,
               f"(f) {variant}: {what}")
  fig.suptitle("Stability study: residual vs HC vs mHC (token-averaged H_res on the diagnostics "
               "batch)")
  fig.savefig(path, dpi=90)


def _fmt_gain(entry, direction):
  value, at = entry[f"max_composite_{direction}"], entry[f"max_composite_{direction}_at"]
  if at["step"] is None:
    return "—"
  return f"{value:.4g} (step {at['step']}, layer {at['layer']}, seed {at['seed']})"


def readme_table(summary, cfg_line, spike_factor, spike_window):
  """The study's README: what was run, then one row per variant."""
  lines = [
      "# Stability study", "", cfg_line, "",
      "| variant | final eval loss (mean ± std) | gap to residual | max composite fwd gain | "
      "max composite bwd gain | grad-norm spikes per seed |",
      "|---|---|---|---|---|---|"]
  for variant, e in summary.items():
    gap = e.get("gap_to_residual")
    spikes = str(e["grad_norm_spikes"])
    if e["diverged_seeds"]:
      spikes += f"; diverged: seeds {e['diverged_seeds']}"
    lines.append(
        f"| {variant} | {e['eval_loss_mean']:.4f} ± {e['eval_loss_std']:.4f} | "
        f"{'—' if gap is None else f'{gap:+.4f}'} | {_fmt_gain(e, 'fwd')} | "
        f"{_fmt_gain(e, 'bwd')} | {spikes} |")
  lines += [
      "", "Gains are those of the token-averaged `H_res` products on the fixed diagnostics batch, "
      "the largest over all logged steps and layers (residual's are 1 by construction). The std "
      "is the sample standard deviation over seeds (0 with one seed). A grad-norm spike is a "
      "logged step whose "
      f"gradient norm (before clipping) exceeds {spike_factor} x the median of the "
      f"{spike_window} logged values before it.", "", "![study](study.png)", ""]
  return "\n".join(lines)


def write_study(runs, study_dir, *, spike_factor, spike_window):
  """Writes `summary.json`, `README.md` and `study.png` into `study_dir`; returns their paths."""
  summary = study.summarize(runs, spike_factor=spike_factor, spike_window=spike_window)
  h_res = {v: study.final_h_res(next(r.workdir for r in runs if r.variant == v))
           for v in HEATMAP_VARIANTS if v in summary}
  paths = [os.path.join(study_dir, name) for name in ("summary.json", "README.md", "study.png")]
  with open(paths[0], "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  t, first = runs[0].config, runs[0].config.model
  cfg_line = (f"{len(runs)} runs: d_model {first.d_model}, {first.num_layers} blocks, n = "
              f"{runs[-1].config.model.n_streams} (residual 1), {t.total_steps} steps of "
              f"{t.batch_size} x {t.seq_len} tokens, lr {t.optimizer.lr}, seeds "
              f"{sorted({r.seed for r in runs})}.")
  with open(paths[1], "w", encoding="utf-8") as f:
    f.write(readme_table(summary, cfg_line, spike_factor, spike_window))
  write_figure(runs, paths[2], h_res)
  return paths
