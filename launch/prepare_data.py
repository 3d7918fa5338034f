r"""Tokenizes text files into a corpus directory (format in `mhc_jax/corpus.py`).

  python -m launch.prepare_data --input='~/text/*.md,~/text/**/*.txt' --output=data/notes \
      --tokenizer=sentencepiece --vocab_size=4096 --val_fraction=0.05

writes `data/notes/{meta.json,train.bin,val.bin,tokenizer.model}`; then train with
`--config.data_dir=data/notes`. `--tokenizer=bytes` (the default) needs no training and has
vocab 256. The split is by file (sha256 of the path relative to the files' common directory; see
`corpus.split_files`); a single file is split at a line break near its last `val_fraction` of
bytes. The sentencepiece model is trained locally on the train files only.
"""

import dataclasses
import glob
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from absl import app
from absl import flags
import numpy as np

from mhc_jax.training import corpus

_INPUT = flags.DEFINE_multi_string(
    "input", None, "Glob(s) of text files; comma separated and/or repeated; `**` recurses.")
_OUTPUT = flags.DEFINE_string("output", None, "Corpus directory to write.")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "bytes", list(corpus.TOKENIZERS), "Tokenizer kind.")
_VOCAB_SIZE = flags.DEFINE_integer(
    "vocab_size", None, "sentencepiece vocabulary size (default 8192); must be 256 for bytes.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.05, "Fraction of files held out for val.")
_BYTE_FALLBACK = flags.DEFINE_bool(
    "byte_fallback", True, "sentencepiece: encode unseen characters as bytes (vocab >= 512).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing corpus at --output.")

DEFAULT_SP_VOCAB_SIZE = 8192
SP_MAX_TRAIN_LINES = 2_000_000  # sentencepiece samples this many lines of the train files


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
  """Sorted unique files matching comma-separated globs (`~` expanded, `**` recursive)."""
  globs = [g.strip() for pattern in patterns for g in pattern.split(",") if g.strip()]
  if not globs:
    raise ValueError("--input is empty; pass a glob of text files, e.g. --input='corpus/*.txt'.")
  files = set()
  for g in globs:
    matches = [Path(m) for m in glob.glob(os.path.expanduser(g), recursive=True)]
    matches = [m for m in matches if m.is_file()]
    if not matches:
      raise ValueError(f"--input glob {g!r} matches no file; check the path and quote the glob.")
    files.update(Path(os.path.abspath(m)) for m in matches)
  return sorted(files)


@dataclasses.dataclass(frozen=True)
class Piece:
  """Bytes `[start, stop)` of a file (`stop=None`: to the end); read only when tokenized."""

  path: Path
  start: int = 0
  stop: int | None = None

  def read(self) -> bytes:
    with open(self.path, "rb") as f:
      f.seek(self.start)
      return f.read(-1 if self.stop is None else self.stop - self.start)


def _tail_cut(path: Path, size: int, val_fraction: float) -> int:
  """Byte offset where the val tail starts: after the first newline past the cut if one is near,
  else at the cut moved back to the start of a utf-8 character."""
  cut = min(int(size * (1.0 - val_fraction)), size - 1)
  lo = max(cut - 3, 0)
  with open(path, "rb") as f:
    f.seek(lo)
    block = f.read(cut - lo + (1 << 16))
  newline = block.find(b"\n", cut - lo)
  if newline != -1 and lo + newline + 1 < size:
    return lo + newline + 1
  while cut > lo and (block[cut - lo] & 0xC0) == 0x80:
    cut -= 1
  return cut


def split_inputs(files: Sequence[Path], val_fraction: float) -> dict[str, list[Piece]]:
  """`{"train": pieces, "val": pieces}`: by file, or a single file's tail; empty files skipped."""
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"--val_fraction={val_fraction}; expected a value in (0, 1), e.g. 0.05.")
  files = [f for f in files if f.stat().st_size > 0]
  if not files:
    raise ValueError("all files matched by --input are empty; nothing to tokenize.")
  if len(files) == 1:
    (path,) = files
    size = path.stat().st_size
    cut = _tail_cut(path, size, val_fraction)
    if not 0 < cut < size:
      raise ValueError(f"the only input file, {path} ({size} bytes), is too small to split "
                       "into train and val; add text or files.")
    return {"train": [Piece(path, 0, cut)], "val": [Piece(path, cut)]}
  root = Path(os.path.commonpath(files))
  by_rel = {f.relative_to(root).as_posix(): f for f in files}
  train, val = corpus.split_files(list(by_rel), val_fraction)
  return {"train": [Piece(by_rel[r]) for r in train], "val": [Piece(by_rel[r]) for r in val]}


def train_sentencepiece(texts: Iterable[str], vocab_size: int, byte_fallback: bool) -> bytes:
  """Serialized BPE model that round-trips code and prose: no normalization, `\\n` a piece."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if byte_fallback and vocab_size < 512:
    raise ValueError(f"--vocab_size={vocab_size} is too small with --byte_fallback (256 byte "
                     "pieces); use --vocab_size >= 512 or --nobyte_fallback.")
  lines = (line for text in texts for line in text.splitlines(keepends=True))
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, user_defined_symbols=["\n", "\t"], character_coverage=1.0,
        byte_fallback=byte_fallback, allow_whitespace_only_pieces=True, split_digits=True,
        input_sentence_size=SP_MAX_TRAIN_LINES, shuffle_input_sentence=True, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"sentencepiece training failed for --vocab_size={vocab_size}: {e}. "
                     "A small corpus supports only a small vocabulary; lower --vocab_size.") from e
  return model.getvalue()


def prepare(
    inputs: Sequence[str], output: str | os.PathLike, *, tokenizer: str = "bytes",
    vocab_size: int | None = None, val_fraction: float = 0.05, byte_fallback: bool = True,
    overwrite: bool = False,
) -> corpus.CorpusMeta:
  """Tokenizes the files matching `inputs` into the corpus directory `output`."""
  output = Path(output)
  if (output / corpus.META_FILE).exists() and not overwrite:
    raise ValueError(f"--output={str(output)!r} already holds a corpus; pass --overwrite to "
                     "replace it or choose another directory.")
  if tokenizer == "bytes" and vocab_size not in (None, corpus.BYTE_VOCAB_SIZE):
    raise ValueError(f"--vocab_size={vocab_size} with --tokenizer=bytes; the byte vocabulary "
                     "is 256: drop --vocab_size or use --tokenizer=sentencepiece.")
  files = expand_inputs(inputs)
  pieces = split_inputs(files, val_fraction)
  num_files = {split: len(pieces[split]) for split in corpus.SPLITS}
  source = f"{len(files)} files matching --input={','.join(inputs)}"
  if tokenizer == "bytes":
    return corpus.write_corpus(
        output, {split: (np.frombuffer(p.read(), np.uint8) for p in pieces[split])
                 for split in corpus.SPLITS},
        vocab_size=corpus.BYTE_VOCAB_SIZE, tokenizer="bytes", source=source,
        num_files=num_files)
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  def texts(split):
    for piece in pieces[split]:
      yield piece.read().decode("utf-8", errors="replace")

  model = train_sentencepiece(texts("train"), vocab_size or DEFAULT_SP_VOCAB_SIZE, byte_fallback)
  sp = spm.SentencePieceProcessor(model_proto=model)

  def tokens(split):
    for text in texts(split):
      yield np.asarray(sp.encode(text) + [sp.eos_id()], np.int64)

  return corpus.write_corpus(
      output, {split: tokens(split) for split in corpus.SPLITS}, vocab_size=sp.vocab_size(),
      tokenizer="sentencepiece", source=source, num_files=num_files, tokenizer_model=model)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass everything as flags.")
  if not _INPUT.value or not _OUTPUT.value:
    raise app.UsageError("--input and --output are required; see the module docstring.")
  meta = prepare(_INPUT.value, _OUTPUT.value, tokenizer=_TOKENIZER.value,
                 vocab_size=_VOCAB_SIZE.value, val_fraction=_VAL_FRACTION.value,
                 byte_fallback=_BYTE_FALLBACK.value, overwrite=_OVERWRITE.value)
  print(f"wrote {meta.path}: {meta.tokenizer} vocab {meta.vocab_size}, "
        f"train {meta.num_tokens['train']:,} tokens ({meta.num_files['train']} files), "
        f"val {meta.num_tokens['val']:,} tokens ({meta.num_files['val']} files), "
        f"fingerprint {meta.fingerprint[:12]}")


if __name__ == "__main__":
  app.run(main)
