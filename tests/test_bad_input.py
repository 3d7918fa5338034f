"""Bad input stops a run with one clear error naming the field and the fix, and nothing written
is lost: bad flags, configs, data, another model's workdir, a non-finite loss."""

from pathlib import Path
import shutil

import pytest

from launch import prepare_data
from mhc_jax.training import corpus, metrics, train
from tests import helpers


pytestmark = pytest.mark.usefixtures("compile_cache")


# --- bad input: a clear error, no traceback ---------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    ({"data.dir": "/nonexistent"}, "'/nonexistent' does not exist"),
    ({"model.n_streams": 0}, "model.n_streams=0 is invalid"),
    ({"model.d_modle": 64},
     "--config.model.d_modle: config.model has no field 'd_modle'; did you mean "
     "--config.model.d_model?"),
    ({"optimiser.lr": 0.1}, "config has no field 'optimiser'; did you mean --config.optimizer?"),
], ids=["missing_data_dir", "n_streams_0", "misspelt_field", "misspelt_section"])
def test_cli_bad_input_is_one_clear_line(tmp_path, cache_dir, overrides, message):
  proc = helpers.run(helpers.train_argv(tmp_path / "run", cache_dir, overrides), cache_dir)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1, proc.stderr[-3000:]
  assert message in error_lines[0]
  assert helpers.checkpoint_steps(tmp_path / "run") == []


def _empty_corpus(tmp_path):
  corpus.write_corpus(tmp_path / "empty", {"train": [], "val": []}, vocab_size=256,
                      tokenizer="bytes", source="empty")
  return str(tmp_path / "empty")


def _tiny_corpus(tmp_path):
  """A prepared byte corpus with 5000 train and ~250 val tokens (the tail of one file)."""
  text = tmp_path / "tiny.txt"
  text.write_text("".join(f"line {i:04d} of a tiny corpus\n" for i in range(190)))
  meta = prepare_data.prepare([str(text)], tmp_path / "tiny", val_fraction=0.05)
  assert 64 < meta.num_tokens["val"] < 400 < meta.num_tokens["train"]
  return str(tmp_path / "tiny")


@pytest.mark.parametrize("make_overrides,message", [
    (lambda tmp: {"data.dir": "/nonexistent"}, "data_dir='/nonexistent' does not exist"),
    (lambda tmp: {"data.dir": str(tmp)}, "has no meta.json"),
    (lambda tmp: {"data.dir": _empty_corpus(tmp)}, r"longer than the train split .*\(0 tokens"),
    (lambda tmp: {"data.dir": _tiny_corpus(tmp), "seq_len": 512},
     r"seq_len=512 is longer than the val split"),
    (lambda tmp: {"data.dir": _tiny_corpus(tmp), "seq_len": 128},
     r"global_batch_size=4 is more than the \d windows .* val split"),
    (lambda tmp: {"model.n_streams": 0}, r"model\.n_streams=0 is invalid"),
    (lambda tmp: {"model.d_model": 30, "model.num_heads": 4},
     r"model\.d_model=30 is invalid: must be divisible by num_heads=4"),
    (lambda tmp: {"model.connection": "dense"}, r"model\.connection='dense' is invalid"),
    (lambda tmp: {"model.num_kv_heads": 3}, r"model\.num_kv_heads=3 is invalid"),
    (lambda tmp: {"total_steps": 0}, r"config\.total_steps=0 is invalid"),
    (lambda tmp: {"batch_size": -4}, r"config\.batch_size=-4 is invalid"),
    (lambda tmp: {"log_every": 0}, r"config\.log_every=0 is invalid"),
    (lambda tmp: {"mesh.model": 3}, r"mesh\.model=3 must be >= 1 and divide"),
    (lambda tmp: {"optimizer.schedule": "linear"}, r"optimizer\.schedule='linear' is invalid"),
], ids=["missing_dir", "not_a_corpus", "empty_corpus", "seq_len_over_val", "val_under_batch",
        "n_streams_0", "d_model_vs_heads", "connection", "kv_heads", "total_steps_0",
        "batch_size_negative", "log_every_0", "mesh_model", "schedule"])
def test_bad_config_raises_value_error(tmp_path, cache_dir, make_overrides, message):
  config = helpers.smoke_config(cache_dir, make_overrides(tmp_path))
  with pytest.raises(ValueError, match=message) as info:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  raised_in = Path(info.traceback[-1].path).resolve()
  assert raised_in.is_relative_to(helpers.REPO / "mhc_jax"), f"raised in {raised_in}, not mhc_jax"
  assert helpers.checkpoint_steps(tmp_path / "run") == []


def test_workdir_of_another_model_is_refused_and_kept(tmp_path, cache_dir, smoke_run):
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir)
  before = {p.relative_to(workdir): p.stat().st_mtime_ns for p in workdir.rglob("*")
            if p.is_file() and "tensorboard" not in p.parts}
  with pytest.raises(ValueError, match=r"model\.d_model: checkpoint 32 vs now 64") as info:
    train.train_and_evaluate(helpers.smoke_config(cache_dir, {"model.d_model": 64}), str(workdir))
  assert "num_layers" not in str(info.value)  # only the field that differs is named
  after = {p.relative_to(workdir): p.stat().st_mtime_ns for p in workdir.rglob("*")
           if p.is_file() and "tensorboard" not in p.parts}
  assert after == before  # checkpoints, metrics.jsonl and config.json untouched
  assert helpers.checkpoint_steps(workdir) == [6, 12]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
  # An absurd learning rate: step 1 is finite (init params), step 2 overflows.
  config = helpers.smoke_config(cache_dir, {"optimizer.lr": 1e30, "optimizer.warmup_steps": 0,
                               "checkpoint_every": 1, "log_every": 1})
  with pytest.raises(train.NonFiniteLossError, match=r"train_loss is (nan|inf) at step 2"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert helpers.checkpoint_steps(tmp_path / "run") == [1]
  assert [r["step"] for r in metrics.read_metrics(tmp_path / "run")] == [1]
