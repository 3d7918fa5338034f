"""Tests of the token-file format, prepare_data, the stdlib corpus and the grain pipelines."""

from pathlib import Path
import pickle
import subprocess
import sys

from absl.testing import flagsaver
import grain
import numpy as np
import pytest

from launch import prepare_data
from mhc_jax.training import corpus, data

REPO = Path(__file__).resolve().parents[1]


def _arange_corpus(path, num_train, num_val, vocab_size=65536):
  """Corpus whose token at position i is i % vocab: windows are easy to identify."""
  return corpus.write_corpus(
      path, {"train": [np.arange(num_train) % vocab_size],
             "val": [np.arange(num_val) % vocab_size]},
      vocab_size=vocab_size, tokenizer="bytes" if vocab_size == 256 else "sentencepiece",
      source="test", tokenizer_model=None if vocab_size == 256 else b"unused")


def _window_ids(batch, seq_len):
  assert np.all(batch["inputs"][:, 0] % seq_len == 0)
  return (batch["inputs"][:, 0] // seq_len).tolist()


# --- token files -------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size,dtype", [(256, "uint8"), (1000, "uint16"),
                                              (65536, "uint16"), (70000, "uint32")])
def test_token_file_round_trip(tmp_path, vocab_size, dtype):
  rng = np.random.default_rng(0)
  train = [rng.integers(0, vocab_size, n) for n in (100, 0, 37)]
  val = [rng.integers(0, vocab_size, 20)]
  model = None if vocab_size == 256 else b"model bytes"
  meta = corpus.write_corpus(
      tmp_path / "c", {"train": train, "val": val}, vocab_size=vocab_size,
      tokenizer="bytes" if model is None else "sentencepiece", source="unit test",
      num_files={"train": 3, "val": 1}, tokenizer_model=model)
  assert meta.dtype == dtype
  assert corpus.read_meta(tmp_path / "c") == meta
  np.testing.assert_array_equal(corpus.load_split(tmp_path / "c", "train"), np.concatenate(train))
  np.testing.assert_array_equal(corpus.load_split(tmp_path / "c", "val"), val[0])
  assert meta.num_tokens == {"train": 137, "val": 20}
  assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(
      ["meta.json", "train.bin", "val.bin"] + ([] if model is None else ["tokenizer.model"]))
  assert (tmp_path / "c" / "train.bin").stat().st_size == 137 * np.dtype(dtype).itemsize


def test_fingerprint_tracks_content(tmp_path):
  a = _arange_corpus(tmp_path / "a", 100, 10, 256)
  b = _arange_corpus(tmp_path / "b", 100, 10, 256)
  c = _arange_corpus(tmp_path / "c", 101, 10, 256)
  assert a.fingerprint == b.fingerprint != c.fingerprint


def test_bad_tokens_leave_no_corpus(tmp_path):
  with pytest.raises(ValueError, match=r"outside \[0, vocab_size=256\)"):
    corpus.write_corpus(tmp_path, {"train": [np.array([1, 300])], "val": [np.array([1])]},
                        vocab_size=256, tokenizer="bytes", source="x")
  assert list(tmp_path.iterdir()) == []  # No meta.json, no temp files.


def test_truncated_split_is_detected(tmp_path):
  _arange_corpus(tmp_path, 100, 10, 256)
  with open(tmp_path / "train.bin", "r+b") as f:
    f.truncate(50)
  with pytest.raises(ValueError, match="size 50 bytes.*100 uint8 tokens.*corrupt"):
    corpus.load_split(tmp_path, "train")


def test_encode_decode_bytes(tmp_path):
  meta = _arange_corpus(tmp_path, 10, 10, 256)
  text = "def f(x):\n\treturn 'é日本'\n"
  tokens = corpus.encode(text, meta)
  assert tokens.dtype == np.int32 and len(tokens) == len(text.encode())
  assert corpus.decode(tokens, meta) == text
  assert corpus.decode(tokens[:-3], meta).endswith("\ufffd")  # Cut inside a character.


# --- prepare_data ------------------------------------------------------------------------------


@pytest.fixture
def text_files(tmp_path):
  src = tmp_path / "src"
  (src / "sub").mkdir(parents=True)
  texts = {f"f{i:02d}.txt": f"file {i}: the quick brown fox {i * 'ab'}\n\tjumps é\n" * (i + 1)
           for i in range(20)}
  texts["sub/deep.txt"] = "nested file\n"
  for name, text in texts.items():
    (src / name).write_text(text)
  (src / "empty.txt").write_text("")
  return src, texts


def test_prepare_data_cli_bytes_split_by_file(tmp_path, text_files):
  src, texts = text_files
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "launch.prepare_data", f"--input={src}/*.txt",
         f"--input={src}/sub/*.txt", f"--output={out}", "--val_fraction=0.2"]
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
  meta = corpus.read_meta(out)
  assert meta.tokenizer == "bytes" and meta.vocab_size == 256
  train_names, val_names = corpus.split_files(list(texts), 0.2)
  assert val_names and meta.num_files == {"train": len(train_names), "val": len(val_names)}
  for split, names in (("train", train_names), ("val", val_names)):
    want = "".join(texts[n] for n in names)
    assert corpus.decode(corpus.load_split(out, split), meta) == want
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  assert again.returncode != 0 and "pass --overwrite" in again.stderr
  subprocess.run(cmd + [f"--output={tmp_path / 'out2'}"], cwd=REPO, check=True)
  assert corpus.read_meta(tmp_path / "out2").fingerprint == meta.fingerprint  # Deterministic.


def test_prepare_sentencepiece_round_trip(tmp_path, text_files):
  src, texts = text_files
  meta = prepare_data.prepare([f"{src}/**/*.txt"], tmp_path / "sp", tokenizer="sentencepiece",
                              vocab_size=60, val_fraction=0.2, byte_fallback=False)
  assert meta.tokenizer == "sentencepiece" and meta.vocab_size == 60 and meta.dtype == "uint8"
  assert meta.tokenizer_model_path == tmp_path / "sp" / "tokenizer.model"
  train_names, val_names = corpus.split_files(list(texts), 0.2)
  for split, names in (("train", train_names), ("val", val_names)):
    tokens = corpus.load_split(tmp_path / "sp", split)
    assert corpus.decode(tokens, meta) == "".join(texts[n] for n in names)  # </s> decodes to "".
  text = "\tthe fox é\n"
  assert corpus.decode(corpus.encode(text, meta), meta) == text


def test_prepare_main_single_file_tail_split(tmp_path):
  lines = [f"line {i}\n" for i in range(100)]
  (tmp_path / "one.txt").write_text("".join(lines))
  flags = prepare_data.flags.FLAGS
  if not flags.is_parsed():
    flags.mark_as_parsed()
  with flagsaver.flagsaver(input=[str(tmp_path / "one.txt")], output=str(tmp_path / "out"),
                           val_fraction=0.1):
    prepare_data.main(["prepare_data"])
  meta = corpus.read_meta(tmp_path / "out")
  train = corpus.decode(corpus.load_split(tmp_path / "out", "train"), meta)
  val = corpus.decode(corpus.load_split(tmp_path / "out", "val"), meta)
  assert train + val == "".join(lines) and val.startswith("line ") and train.endswith("\n")
  assert 0.05 < len(val) / (len(train) + len(val)) < 0.15


def test_prepare_errors(tmp_path, text_files):
  src, _ = text_files
  with pytest.raises(ValueError, match="matches no file"):
    prepare_data.prepare([f"{src}/*.nothing"], tmp_path / "o")
  with pytest.raises(ValueError, match="all files matched by --input are empty"):
    prepare_data.prepare([f"{src}/empty.txt"], tmp_path / "o")
  with pytest.raises(ValueError, match="--vocab_size=100 with --tokenizer=bytes"):
    prepare_data.prepare([f"{src}/*.txt"], tmp_path / "o", vocab_size=100)
  with pytest.raises(ValueError, match="lower --vocab_size"):
    prepare_data.prepare([f"{src}/f00.txt", f"{src}/f01.txt"], tmp_path / "o",
                         tokenizer="sentencepiece", vocab_size=5000, byte_fallback=False)


# --- split and stdlib corpus -------------------------------------------------------------------


def test_split_files_is_deterministic_and_stable():
  names = [f"pkg/mod_{i}.py" for i in range(400)]
  train, val = corpus.split_files(names, 0.05)
  assert (train, val) == corpus.split_files(names[::-1], 0.05)
  assert set(train).isdisjoint(val) and set(train) | set(val) == set(names)
  assert 5 <= len(val) <= 40
  more_train, more_val = corpus.split_files(names + [f"new_{i}.py" for i in range(50)], 0.05)
  assert set(val) <= set(more_val) and set(train) <= set(more_train)  # Old files stay put.
  assert all(len(s) == 1 for s in corpus.split_files(["a.py", "b.py"], 0.05))


def test_stdlib_corpus(tmp_path):
  root, relpaths = corpus.stdlib_files()
  assert relpaths == sorted(relpaths) and "os.py" in relpaths
  assert all(p.endswith(".py") and "site-packages" not in p for p in relpaths)
  path = corpus.ensure_stdlib_corpus(tmp_path)  # ~1.5 s: 31 MB of bytes.
  meta = corpus.read_meta(path)
  assert path.name.startswith(f"stdlib-{sys.version_info[0]}.{sys.version_info[1]}.")
  assert meta.tokenizer == "bytes" and meta.num_files["train"] + meta.num_files["val"] == len(
      relpaths)
  assert 0.01 < meta.num_tokens["val"] / meta.num_tokens["train"] < 0.1
  mtime = (path / "meta.json").stat().st_mtime_ns
  assert corpus.ensure_stdlib_corpus(tmp_path) == path
  assert (path / "meta.json").stat().st_mtime_ns == mtime  # Reused, not rebuilt.
  assert data.resolve_data_dir(None, cache_dir=tmp_path) == path
  batch = data.diagnostic_batch(path, seq_len=64, global_batch_size=2, process_index=0,
                                process_count=1)
  assert batch["inputs"].shape == (2, 64)
  _, val = corpus.split_files(relpaths, corpus.STDLIB_VAL_FRACTION)
  first_val_file = (root / val[0]).read_bytes()[:64]
  assert corpus.decode(batch["inputs"][0], meta) == first_val_file.decode("utf-8", "replace")


# --- grain pipelines ---------------------------------------------------------------------------


def test_train_batches_shapes_and_shift(tmp_path):
  _arange_corpus(tmp_path, 10 * 16 + 1, 100)
  it = data.make_train_iterator(tmp_path, seq_len=16, global_batch_size=4, seed=0,
                                process_index=0, process_count=1)
  seen = []
  for _ in range(5):  # Two epochs of 10 windows and a half.
    batch = next(it)
    assert set(batch) == {"inputs", "targets"}
    for x in batch.values():
      assert x.shape == (4, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
    seen += _window_ids(batch, 16)
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
  assert seen[:10] != seen[10:20]  # Reshuffled each epoch.


def test_shuffle_is_seeded(tmp_path):
  _arange_corpus(tmp_path, 1000 * 8 + 1, 100)
  def ids(seed):
    ds = data.train_dataset(tmp_path, seq_len=8, global_batch_size=16, seed=seed,
                            process_index=0, process_count=1)
    return [_window_ids(ds[t], 8) for t in range(5)]
  assert ids(1) == ids(1) and ids(1) != ids(2)
  assert ids(1) != [list(range(16 * t, 16 * t + 16)) for t in range(5)]


def test_iterator_state_restores_mid_epoch(tmp_path):
  _arange_corpus(tmp_path, 50 * 8 + 1, 100)
  kwargs = dict(seq_len=8, global_batch_size=4, seed=3, process_index=0, process_count=1)
  it = data.make_train_iterator(tmp_path, **kwargs)
  for _ in range(7):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(20)]  # Crosses the epoch boundary at 12.5 steps.
  fresh = data.make_train_iterator(tmp_path, **kwargs)
  next(fresh)
  fresh.set_state(state)
  for w in want:
    got = next(fresh)
    np.testing.assert_array_equal(got["inputs"], w["inputs"])
    np.testing.assert_array_equal(got["targets"], w["targets"])


def test_iterator_orbax_checkpoint(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _arange_corpus(tmp_path / "c", 50 * 8 + 1, 100)
  kwargs = dict(seq_len=8, global_batch_size=4, seed=3)
  train_iter = data.make_train_iterator(tmp_path / "c", **kwargs)
  for _ in range(5):
    next(train_iter)
  state = {"w": np.arange(3.0)}
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(train_iter)))
    mngr.wait_until_finished()
  want = [next(train_iter) for _ in range(3)]
  train_iter = data.make_train_iterator(tmp_path / "c", **kwargs)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state),
        data_iter=grain.checkpoint.CheckpointRestore(train_iter)))
  assert restored.data_iter is train_iter
  np.testing.assert_array_equal(restored.state["w"], state["w"])
  for w in want:
    np.testing.assert_array_equal(next(train_iter)["inputs"], w["inputs"])


def test_processes_get_disjoint_rows_of_the_global_batch(tmp_path):
  _arange_corpus(tmp_path, 100 * 8 + 1, 100)
  def ds(p, n):
    return data.train_dataset(tmp_path, seq_len=8, global_batch_size=6, seed=0,
                              process_index=p, process_count=n)
  one, p0, p1 = ds(0, 1), ds(0, 2), ds(1, 2)
  for t in range(40):  # Several epochs.
    a, b = _window_ids(p0[t], 8), _window_ids(p1[t], 8)
    assert len(a) == len(b) == 3 and set(a).isdisjoint(b)
    assert sorted(a + b) == sorted(_window_ids(one[t], 8))  # Same global batch for any count.


def test_eval_dataset(tmp_path):
  _arange_corpus(tmp_path, 100, 23 * 4 + 1)
  ds = data.eval_dataset(tmp_path, seq_len=4, global_batch_size=4, process_index=0,
                         process_count=1)
  assert len(ds) == 5  # 23 windows, the last partial batch dropped.
  assert [_window_ids(b, 4) for b in ds] == [list(range(4 * i, 4 * i + 4)) for i in range(5)]
  assert [_window_ids(b, 4) for b in ds] == [_window_ids(b, 4) for b in ds]  # Re-iterable.
  p1 = data.eval_dataset(tmp_path, seq_len=4, global_batch_size=4, max_batches=2,
                         process_index=1, process_count=2)
  assert [_window_ids(b, 4) for b in p1] == [[1, 3], [5, 7]]
  diag = data.diagnostic_batch(tmp_path, seq_len=4, global_batch_size=4, process_index=0,
                               process_count=1)
  np.testing.assert_array_equal(diag["inputs"], ds[0]["inputs"])
  np.testing.assert_array_equal(diag["targets"], ds[0]["targets"])


# --- errors ------------------------------------------------------------------------------------


def test_missing_data_dir(tmp_path):
  with pytest.raises(ValueError, match=r"does not exist.*python -m launch.prepare_data"):
    data.make_train_iterator(tmp_path / "nope", seq_len=8, global_batch_size=2, seed=0)
  with pytest.raises(ValueError, match="has no meta.json"):
    data.train_dataset(tmp_path, seq_len=8, global_batch_size=2, seed=0)


def test_empty_corpus(tmp_path):
  corpus.write_corpus(tmp_path, {"train": [], "val": []}, vocab_size=256, tokenizer="bytes",
                      source="nothing")
  with pytest.raises(ValueError, match=r"seq_len=8 is longer than the train split .*\(0 tokens"):
    data.train_dataset(tmp_path, seq_len=8, global_batch_size=2, seed=0)


def test_seq_len_longer_than_val(tmp_path):
  _arange_corpus(tmp_path, 10_000, 300, 256)
  with pytest.raises(ValueError, match=r"seq_len=512 is longer than the val split .*300 tokens"):
    data.eval_dataset(tmp_path, seq_len=512, global_batch_size=2)
  with pytest.raises(ValueError, match="global_batch_size=64 is more than the 2 windows"):
    data.eval_dataset(tmp_path, seq_len=128, global_batch_size=64)


def test_bad_batch_arguments(tmp_path):
  _arange_corpus(tmp_path, 10_000, 300, 256)
  with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by process_count=4"):
    data.train_dataset(tmp_path, seq_len=8, global_batch_size=6, seed=0, process_index=0,
                       process_count=4)
  with pytest.raises(ValueError, match="process_index=2"):
    data.train_dataset(tmp_path, seq_len=8, global_batch_size=6, seed=0, process_index=2,
                       process_count=2)
  with pytest.raises(ValueError, match="seq_len=0"):
    data.train_dataset(tmp_path, seq_len=0, global_batch_size=6, seed=0)


def test_token_windows_pickle(tmp_path):
  _arange_corpus(tmp_path, 100, 10, 256)
  windows = data.TokenWindows(tmp_path, "train", seq_len=8)
  again = pickle.loads(pickle.dumps(windows))
  assert len(again) == len(windows) == 12
  np.testing.assert_array_equal(again[11], np.arange(88, 97))
  assert len(pickle.dumps(windows)) < 1000  # The path, not the tokens.
