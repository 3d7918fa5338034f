"""Training metrics: a JSON-lines log plus TensorBoard events, and a console progress bar.

`<workdir>/metrics.jsonl` holds one line per logged step, `{"step": ..., **scalars, **per_layer}`,
where per-layer values are lists with one float per connection layer. Each line is flushed as it
is written, so a killed run keeps every line it logged; on resume from a checkpoint at step K,
`truncate_after(K)` drops the lines the killed run logged past K, so the resumed run ends with the
same lines as an uninterrupted one. Non-finite values are written as `NaN`/`Infinity`, which
Python's `json` reads back. TensorBoard events go to `<workdir>/tensorboard/`, with per-layer
lists as `name/layer_XX` scalars. `run_config_field` reads the run's `config.json`.
"""

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"


def _parse_lines(path: Path) -> list[dict]:
  """Records of a metrics file; a torn last line (a kill mid-write) is dropped."""
  lines = path.read_text().split("\n")
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:  # No newline after it: the write was cut off.
        break
      raise ValueError(f"{path}:{i + 1} is not valid JSON ({e}); fix or delete that line.") from e
  return records


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """All records of `<workdir>/metrics.jsonl`, in file order."""
  path = Path(workdir) / METRICS_FILE
  if not path.is_file():
    raise ValueError(f"{path} does not exist; run training with workdir={str(workdir)!r} first "
                     "(it writes metrics.jsonl), or pass the workdir of a training run.")
  return _parse_lines(path)


class MetricsWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard; a no-op when not `enabled`."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.workdir = Path(workdir)
    self.path = self.workdir / METRICS_FILE
    self.enabled = enabled
    self._file: TextIO | None = None
    self._tb = None
    self._purge_step: int | None = None

  def write(self, step: int, scalars: Mapping[str, float],
            per_layer: Mapping[str, Sequence[float]] | None = None) -> None:
    """Logs one step: a flushed JSON line and TensorBoard scalars."""
    if not self.enabled:
      return
    per_layer = per_layer or {}
    keys = ["step", *scalars, *per_layer]
    clash = sorted({k for k in keys if keys.count(k) > 1})
    if clash:
      raise ValueError(f"MetricsWriter.write: keys {clash} appear twice (as step, scalar or "
                       "per-layer); rename them.")
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()},
              **{k: np.asarray(v, np.float64).reshape(-1).tolist() for k, v in per_layer.items()}}
    if self._file is None:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    tb = self._tensorboard()
    for name, value in record.items():
      if isinstance(value, list):
        for layer, x in enumerate(value):
          tb.add_scalar(f"{name}/layer_{layer:02d}", x, record["step"])
      elif name != "step":
        tb.add_scalar(name, value, record["step"])
    tb.flush()

  def truncate_after(self, step: int) -> None:
    """Keeps only records with `step <= step` (atomic rewrite); call on resume from `step`.

    TensorBoard drops its events past `step` too (tensorboardX `purge_step`).
    """
    if not self.enabled:
      return
    self._close_files()
    self._purge_step = int(step) + 1
    if not self.path.is_file():
      return
    kept = [r for r in _parse_lines(self.path) if r["step"] <= step]
    fd, tmp = tempfile.mkstemp(dir=self.workdir, prefix=f".{METRICS_FILE}.", suffix=".tmp")
    try:
      os.chmod(tmp, 0o644)  # mkstemp makes 0600; keep the log readable like the original.
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    except BaseException:
      Path(tmp).unlink(missing_ok=True)
      raise

  def close(self) -> None:
    self._close_files()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _tensorboard(self):
    if self._tb is None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(self.workdir / TENSORBOARD_DIR), purge_step=self._purge_step)
      self._purge_step = None
    return self._tb

  def _close_files(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  s = int(seconds)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressBar:
  """One status line on stderr: rewritten in place on a terminal, else about every 1% of steps.

  The ETA uses the rate since the first `update`, so compilation before it does not skew it.
  """

  def __init__(self, total_steps: int, start_step: int = 0, *, stream: TextIO | None = None):
    if total_steps < 1:
      raise ValueError(f"ProgressBar: total_steps={total_steps}; pass the run's total (>= 1).")
    self.total_steps = total_steps
    self.stream = stream or sys.stderr
    self.is_tty = self.stream.isatty()
    self._t_start = time.monotonic()
    self._first: tuple[float, int] | None = None  # (time, step) of the first update.
    self._last_printed_pct = (100 * start_step) // total_steps - 1
    self._width = 0

  def update(self, step: int, loss: float, tokens_per_s: float) -> None:
    now = time.monotonic()
    if self._first is None:
      self._first = (now, step)
    t0, step0 = self._first
    rate = (step - step0) / (now - t0) if step > step0 and now > t0 else 0.0
    eta = (self.total_steps - step) / rate if rate else math.inf
    line = (f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%) | "
            f"loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | "
            f"elapsed {_hms(now - self._t_start)} | ETA {_hms(eta)}")
    if self.is_tty:
      self.stream.write("\r" + line.ljust(self._width))
      self._width = len(line)
    else:
      pct = (100 * step) // self.total_steps
      if pct <= self._last_printed_pct and step < self.total_steps:
        return
      self._last_printed_pct = pct
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.is_tty and self._width:
      self.stream.write("\n")
      self.stream.flush()
      self._width = 0


def _find_key(tree: Any, key: str) -> Any:
  """First value of `key` in a nested dict (depth first), or None."""
  if isinstance(tree, dict):
    if key in tree:
      return tree[key]
    for value in tree.values():
      found = _find_key(value, key)
      if found is not None:
        return found
  return None


def run_config_field(workdir: str | os.PathLike, key: str) -> Any:
  """First `key` (depth first) in the run's `<workdir>/config.json`; None if either is missing."""
  path = Path(workdir) / CONFIG_FILE
  return _find_key(json.loads(path.read_text()), key) if path.is_file() else None
