"""grain input pipelines over a token corpus (format in `mhc_jax.corpus`).

An example is a window of `seq_len + 1` tokens, `tokens[i*S : i*S + S + 1]` (windows overlap by
one token so that every token but the first is a target once per epoch); a batch is
`{"inputs": int32 (B, S), "targets": int32 (B, S)}` with `targets[:, t] == inputs[:, t + 1]`
inside the window, B the per-process batch.

Training: windows -> shuffle(seed) -> repeat (reshuffled every epoch) -> this process's rows ->
batch. Process `p` of `P` gets rows `p, p + P, p + 2P, ...` of every logical global batch, so the
set of examples in global step `t` is the same whatever `P`, and processes never overlap. The
iterator is a `grain.DatasetIterator`; its state is `{"next_index": step}` and it is saved with
the train state through Orbax:

  import grain, orbax.checkpoint as ocp
  train_iter = data.make_train_iterator(data_dir, seq_len=S, global_batch_size=B, seed=0)
  mngr = ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(...))
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(train_iter)))
  # Resume: build a fresh iterator with the same arguments, then restore into it (in place).
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data_iter=grain.checkpoint.CheckpointRestore(train_iter)))
  train_iter = restored.data_iter  # the same object, now at the saved position

Each process writes `process_<p>-of-<P>.json`, all holding the same `next_index`, so a run with
another process count resumes from any of them (`checkpoint.restore_data_position`).

Evaluation: `eval_dataset` is a finite, unshuffled `grain.MapDataset` of batches over the val
split (`len()` batches, `ds[i]`, re-iterable); `diagnostic_batch` is its first batch.
`data_dir=None` everywhere means the default corpus, `corpus.ensure_stdlib_corpus()`.
"""

import os
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from mhc_jax.training import corpus

Batch = dict[str, np.ndarray]
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def resolve_data_dir(
    data_dir: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None,
) -> Path:
  """`data_dir` itself, or the stdlib corpus (built into `cache_dir` on first use) for None."""
  if data_dir is None or str(data_dir) == "":
    return corpus.ensure_stdlib_corpus(cache_dir)
  corpus.read_meta(data_dir)  # Raises a ValueError with the fix when it is not a corpus.
  return Path(data_dir)


class TokenWindows:
  """Random-access grain source: window `i` is `tokens[i*S : i*S + S + 1]` as int32 `(S + 1,)`.

  Holds the path, not the memmap, when pickled (grain worker processes reopen the file).
  """

  def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int):
    _check_positive("seq_len", seq_len)
    self.data_dir, self.split, self.seq_len = Path(data_dir), split, seq_len
    self._tokens = corpus.load_split(self.data_dir, split)
    self.num_tokens = len(self._tokens)
    self._len = max(self.num_tokens - 1, 0) // seq_len
    if self._len == 0:
      raise ValueError(
          f"seq_len={seq_len} is longer than the {split} split of {self.data_dir} "
          f"({self.num_tokens} tokens; a window needs seq_len + 1 = {seq_len + 1}); lower "
          f"seq_len (--config.seq_len) or add data (python -m launch.prepare_data ...)."
      )

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> np.ndarray:
    if not 0 <= i < self._len:
      raise IndexError(f"window {i} out of range [0, {self._len}).")
    start = int(i) * self.seq_len
    return np.asarray(self._tokens[start:start + self.seq_len + 1], np.int32)

  def __getstate__(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if k != "_tokens"}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._tokens = corpus.load_split(self.data_dir, self.split)

  def __repr__(self) -> str:
    return f"TokenWindows({str(self.data_dir)!r}, {self.split!r}, seq_len={self.seq_len})"


def _check_positive(name: str, value: int) -> None:
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r}; expected a positive integer.")


def _process_slot(global_batch_size: int, process_index: int | None,
                  process_count: int | None) -> tuple[int, int, int]:
  """`(process_index, process_count, per_process_batch)`, defaulting to jax's process."""
  _check_positive("global_batch_size", global_batch_size)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  _check_positive("process_count", process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}; expected 0 <= it < "
                     f"process_count={process_count}.")
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by process_count="
        f"{process_count}; use a multiple of {process_count} (--config.global_batch_size)."
    )
  return process_index, process_count, global_batch_size // process_count


def _to_inputs_targets(windows_BxS1: np.ndarray) -> Batch:
  return {"inputs": np.ascontiguousarray(windows_BxS1[:, :-1]),
          "targets": np.ascontiguousarray(windows_BxS1[:, 1:])}


def train_dataset(
    data_dir: str | os.PathLike | None, *, seq_len: int, global_batch_size: int, seed: int,
    process_index: int | None = None, process_count: int | None = None,
) -> grain.MapDataset:
  """Infinite `MapDataset` of this process's train batches: `ds[t]` is its part of step `t`."""
  data_dir = resolve_data_dir(data_dir)
  p, n_proc, batch_size = _process_slot(global_batch_size, process_index, process_count)
  windows = grain.MapDataset.source(TokenWindows(data_dir, "train", seq_len))
  ds = windows.shuffle(seed=seed).repeat()
  return ds[p::n_proc].batch(batch_size, drop_remainder=True).map(_to_inputs_targets)


def make_train_iterator(
    data_dir: str | os.PathLike | None, *, seq_len: int, global_batch_size: int, seed: int,
    process_index: int | None = None, process_count: int | None = None,
    read_options: grain.ReadOptions = DEFAULT_READ_OPTIONS,
) -> grain.DatasetIterator:
  """Checkpointable iterator over `train_dataset(...)` batches, prefetched in threads."""
  ds = train_dataset(data_dir, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                     process_index=process_index, process_count=process_count)
  return iter(ds.to_iter_dataset(read_options))


def eval_dataset(
    data_dir: str | os.PathLike | None, *, seq_len: int, global_batch_size: int,
    max_batches: int | None = None, process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
  """Finite, unshuffled batches over the val split, in order; the last partial batch is dropped.

  `max_batches=None` covers the whole split. Batch `i` of every process comes from the same
  global batch (rows `p::P`), so all processes have the same `len()`.
  """
  data_dir = resolve_data_dir(data_dir)
  p, n_proc, batch_size = _process_slot(global_batch_size, process_index, process_count)
  windows = TokenWindows(data_dir, "val", seq_len)
  num_batches = len(windows) // global_batch_size
  if num_batches == 0:
    raise ValueError(
        f"global_batch_size={global_batch_size} is more than the {len(windows)} windows of "
        f"seq_len + 1 = {seq_len + 1} tokens in the val split of {data_dir} "
        f"({windows.num_tokens} tokens); lower the eval batch size or seq_len, or re-create the "
        "corpus with a larger --val_fraction."
    )
  if max_batches is not None:
    _check_positive("max_batches", max_batches)
    num_batches = min(num_batches, max_batches)
  ds = grain.MapDataset.source(windows)[:num_batches * global_batch_size]
  return ds[p::n_proc].batch(batch_size, drop_remainder=True).map(_to_inputs_targets)


def diagnostic_batch(
    data_dir: str | os.PathLike | None, *, seq_len: int, global_batch_size: int,
    process_index: int | None = None, process_count: int | None = None,
) -> Batch:
  """The fixed first val batch (this process's rows), for per-layer diagnostics over training."""
  return eval_dataset(data_dir, seq_len=seq_len, global_batch_size=global_batch_size,
                      max_batches=1, process_index=process_index, process_count=process_count)[0]
