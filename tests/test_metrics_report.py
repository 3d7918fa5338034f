"""Tests of the metrics log (JSON lines, TensorBoard, resume), the progress bar and the report."""

import io
import json
import re

import numpy as np
import pytest

from mhc_jax.training import metrics, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM_CONN_LAYERS = 6


def _per_layer(step, rng):
  """Synthetic diagnostics, shaped like `layer_diagnostics` output (HC-like growing gains)."""
  depth = np.arange(1, NUM_CONN_LAYERS + 1)
  grow = 1.0 + step / 100
  out = {}
  for kind in ("avg", "tok"):
    out[f"diag/single_fwd_{kind}"] = 1.0 + 0.1 * rng.random(NUM_CONN_LAYERS)
    out[f"diag/single_bwd_{kind}"] = 1.0 + 0.1 * rng.random(NUM_CONN_LAYERS)
    out[f"diag/composite_fwd_{kind}"] = grow ** (depth / 2)
    out[f"diag/composite_bwd_{kind}"] = grow ** ((NUM_CONN_LAYERS + 1 - depth) / 2)
  out["diag/composite_min_col_sum"] = 1.0 / grow ** (depth / 4)
  out["diag/marginal_err"] = 1e-4 * rng.random(NUM_CONN_LAYERS)
  return {k: v.tolist() for k, v in out.items()}


def _write_run(workdir, steps=range(0, 501, 50), *, diagnostics=True, eval_every=100,
               config=None):
  rng = np.random.default_rng(0)
  with metrics.MetricsWriter(workdir) as writer:
    for step in steps:
      scalars = {"train_loss": 5.0 * np.exp(-step / 200) + 1.0, "grad_norm": 1.0 + rng.random(),
                 "lr": 1e-3 * min(1.0, (step + 1) / 100), "tokens_per_s": 1e4}
      if eval_every and step % eval_every == 0:
        scalars["eval_loss"] = scalars["train_loss"] + 0.1
      writer.write(step, scalars, _per_layer(step, rng) if diagnostics else None)
  if config is not None:
    (workdir / "config.json").write_text(json.dumps(config))


def _tensorboard_scalars(logdir):
  """`{(tag, step): value}` of the scalar events in the TFRecord event files under `logdir`."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):  # Record: uint64 length, uint32 crc, payload, uint32 crc.
      length = int.from_bytes(data[pos:pos + 8], "little")
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 16 + length
      for value in event.summary.value:
        scalars[value.tag, event.step] = value.simple_value
  return scalars


def test_writer_writes_json_lines_and_tensorboard(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    writer.write(0, {"train_loss": np.float32(2.5), "lr": 1e-3},
                 {"diag/marginal_err": np.array([1e-6, 2e-6])})
    writer.write(10, {"train_loss": 2.0, "eval_loss": 2.1})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # Flushed before close.
  assert [json.loads(line) for line in lines] == [
      {"step": 0, "train_loss": 2.5, "lr": 1e-3, "diag/marginal_err": [1e-6, 2e-6]},
      {"step": 10, "train_loss": 2.0, "eval_loss": 2.1}]
  assert metrics.read_metrics(tmp_path)[1]["eval_loss"] == 2.1
  assert _tensorboard_scalars(tmp_path / "tensorboard") == pytest.approx({
      ("train_loss", 0): 2.5, ("lr", 0): 1e-3, ("diag/marginal_err/layer_00", 0): 1e-6,
      ("diag/marginal_err/layer_01", 0): 2e-6, ("train_loss", 10): 2.0, ("eval_loss", 10): 2.1})


def test_writer_rejects_duplicate_keys(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    with pytest.raises(ValueError, match=r"\['train_loss'\]"):
      writer.write(0, {"train_loss": 1.0}, {"train_loss": [1.0]})
    with pytest.raises(ValueError, match=r"\['step'\]"):
      writer.write(0, {"step": 1.0})


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metrics.MetricsWriter(tmp_path / "run", enabled=False)
  writer.write(0, {"train_loss": 1.0}, {"diag/marginal_err": [0.0]})
  writer.truncate_after(step=0)
  writer.close()
  assert not (tmp_path / "run").exists()


def test_truncate_after_matches_uninterrupted_run(tmp_path):
  def log(writer, steps):
    for step in steps:
      writer.write(step, {"train_loss": 1.0 / (step + 1)}, {"diag/marginal_err": [step, 0.5]})

  full = metrics.MetricsWriter(tmp_path / "full")
  log(full, range(0, 100, 10))
  full.close()

  killed = metrics.MetricsWriter(tmp_path / "resumed")
  log(killed, range(0, 80, 10))  # Killed after step 70; the last checkpoint is at step 40.
  killed.close()
  with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
    f.write('{"step": 80, "train_lo')  # A line torn by the kill.
  resumed = metrics.MetricsWriter(tmp_path / "resumed")
  resumed.truncate_after(step=40)
  assert [r["step"] for r in metrics.read_metrics(tmp_path / "resumed")] == [0, 10, 20, 30, 40]
  log(resumed, range(50, 100, 10))
  resumed.close()
  assert ((tmp_path / "resumed" / "metrics.jsonl").read_text()
          == (tmp_path / "full" / "metrics.jsonl").read_text())
  assert not list((tmp_path / "resumed").glob(".*.tmp"))


def test_read_metrics_errors(tmp_path):
  with pytest.raises(ValueError, match="metrics.jsonl does not exist.*run training"):
    metrics.read_metrics(tmp_path)
  (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2 is not valid JSON"):
    metrics.read_metrics(tmp_path)


def test_progress_bar_plain_stream_prints_about_every_percent():
  stream = io.StringIO()
  bar = metrics.ProgressBar(1000, start_step=0, stream=stream)
  for step in range(0, 1001, 2):
    bar.update(step, loss=2.0, tokens_per_s=1234.0)
  bar.close()
  lines = stream.getvalue().splitlines()
  assert 100 <= len(lines) <= 102
  assert lines[-1].startswith("step 1000/1000 (100%) | loss 2.0000 | 1,234 tok/s | elapsed ")
  assert "ETA" in lines[-1] and "\r" not in stream.getvalue()


def test_progress_bar_tty_rewrites_one_line():
  class Tty(io.StringIO):
    def isatty(self):
      return True
  stream = Tty()
  bar = metrics.ProgressBar(10, start_step=5, stream=stream)
  for step in range(5, 11):
    bar.update(step, loss=1.0, tokens_per_s=10.0)
  bar.close()
  assert stream.getvalue().count("\r") == 6 and stream.getvalue().endswith("\n")
  assert stream.getvalue().count("\n") == 1


def _assert_png(path):
  data = open(path, "rb").read()
  assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_report_with_diagnostics(tmp_path):
  _write_run(tmp_path, config={"model": {"connection": "hc", "n_streams": 4, "num_layers": 3}})
  path = report.write_report(tmp_path)
  assert path == str(tmp_path / "report.png")
  _assert_png(path)


def test_report_without_diagnostics_or_eval(tmp_path):
  _write_run(tmp_path, diagnostics=False, eval_every=0)
  out = tmp_path / "plots" / "r.png"
  assert report.write_report(tmp_path, out) == str(out)
  _assert_png(out)


def test_report_missing_metrics(tmp_path):
  with pytest.raises(ValueError, match=f"{tmp_path}/metrics.jsonl does not exist"):
    report.write_report(tmp_path)


@pytest.mark.parametrize("values,log", [([1.0 - 1e-6, 1.0, 1.0 + 2e-6], False),
                                        ([0.5, 40.0, 3000.0], True)])
def test_gain_axes_read_as_plain_numbers(values, log):
  """No offset notation ("1e-6+9.99e-1") on a gain axis near 1, no 10^k labels on a log one."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  ax = Figure().subplots()
  ax.plot(range(len(values)), values)
  report.plain_gain_axis(ax, log=log)
  ax.figure.canvas.draw()
  labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
  assert labels and ax.yaxis.get_offset_text().get_text() == ""
  assert all(re.fullmatch(r"-?[0-9.]+(e[-+][0-9]+)?", s) for s in labels), labels
  assert not any("$" in s or "\\times" in s for s in labels), labels
