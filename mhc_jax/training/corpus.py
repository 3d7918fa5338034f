"""Tokenized corpora on disk: the token-file format, tokenizers and the embedded stdlib corpus.

A corpus is a directory:

  meta.json          format, vocab_size, dtype, tokenizer, per-split counts and sha256s
  train.bin, val.bin flat little-endian token ids, no header; dtype from the vocab size
                     (uint8 for <= 256, uint16 for <= 65536, else uint32); read with np.memmap
  tokenizer.model    the sentencepiece model, for `tokenizer == "sentencepiece"` only

Files of a split are concatenated in sorted order (sentencepiece appends `</s>` after each file;
the byte tokenizer adds nothing). Every file is written to a temporary name in the same directory
and `os.replace`d into place; `meta.json` is written last (and removed first when a corpus is
overwritten), so a directory holding `meta.json` is complete, and `load_split` checks each
`.bin` size against it.

The default corpus is the `*.py` source of the running interpreter's standard library, byte
tokens, cached by `ensure_stdlib_corpus()`. Validation files are chosen by a hash of their
relative path (`is_val_file`), which is deterministic and stable when files are added.
"""

import dataclasses
import functools
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

FORMAT = "mhc_jax.tokens.v1"
SPLITS = ("train", "val")
TOKENIZERS = ("bytes", "sentencepiece")
BYTE_VOCAB_SIZE = 256
META_FILE = "meta.json"
SP_MODEL_FILE = "tokenizer.model"
STDLIB_VAL_FRACTION = 0.03
PREPARE_HINT = "python -m launch.prepare_data --input='corpus/*.txt' --output=DIR"


def token_dtype(vocab_size: int) -> np.dtype:
  """Smallest unsigned little-endian dtype holding ids `[0, vocab_size)`."""
  if vocab_size < 1:
    raise ValueError(f"vocab_size must be >= 1; got {vocab_size}.")
  for dtype in ("<u1", "<u2", "<u4"):
    if vocab_size <= np.iinfo(dtype).max + 1:
      return np.dtype(dtype)
  raise ValueError(f"vocab_size={vocab_size} does not fit in uint32 token ids.")


@dataclasses.dataclass(frozen=True)
class CorpusMeta:
  """The contents of `meta.json`, plus `path`, the corpus directory it was read from."""

  vocab_size: int
  dtype: str  # numpy name ("uint8", "uint16", "uint32"); little-endian on disk
  tokenizer: str  # "bytes" | "sentencepiece"
  tokenizer_model: str | None  # file name inside the corpus dir, sentencepiece only
  source: str  # free text: where the text came from
  num_tokens: dict[str, int]  # split -> number of tokens
  num_files: dict[str, int]  # split -> number of source files
  sha256: dict[str, str]  # split -> sha256 of the .bin file
  fingerprint: str  # sha256 over tokenizer, vocab and split hashes: changes iff the data does
  format: str = FORMAT
  path: Path | None = dataclasses.field(default=None, compare=False)

  @property
  def tokenizer_model_path(self) -> Path | None:
    if self.tokenizer_model is None or self.path is None:
      return None
    return self.path / self.tokenizer_model

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    del d["path"]
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache must be readable by others.
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _write_split_tmp(data_dir: Path, split: str, chunks: Iterable[np.ndarray], dtype: np.dtype,
                     vocab_size: int) -> tuple[str, int, str]:
  """Streams `chunks` of token ids to a temp file; returns `(tmp_path, num_tokens, sha256)`."""
  fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=f".{split}.bin.", suffix=".tmp")
  sha, num_tokens = hashlib.sha256(), 0
  try:
    os.chmod(tmp, 0o644)
    with os.fdopen(fd, "wb") as f:
      for chunk in chunks:
        chunk = np.asarray(chunk)
        if chunk.size and (chunk.min() < 0 or chunk.max() >= vocab_size):
          raise ValueError(
              f"write_corpus: split {split!r} has token ids in [{chunk.min()}, {chunk.max()}], "
              f"outside [0, vocab_size={vocab_size}); raise vocab_size or fix the tokenizer."
          )
        data = chunk.astype(dtype, copy=False).tobytes()
        sha.update(data)
        f.write(data)
        num_tokens += chunk.size
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return tmp, num_tokens, sha.hexdigest()


def write_corpus(
    data_dir: str | os.PathLike, splits: Mapping[str, Iterable[np.ndarray]], *, vocab_size: int,
    tokenizer: str, source: str, num_files: Mapping[str, int] | None = None,
    tokenizer_model: bytes | None = None,
) -> CorpusMeta:
  """Writes `{split: chunks of token ids}` as a corpus directory, atomically per file.

  `splits` must have exactly the keys `train` and `val`; each value is an iterable of 1-D integer
  arrays (streamed, so a split never needs to fit in memory). `tokenizer_model` is the serialized
  sentencepiece model, required iff `tokenizer == "sentencepiece"`.
  """
  if tokenizer not in TOKENIZERS:
    raise ValueError(f"write_corpus: tokenizer={tokenizer!r}; expected one of {TOKENIZERS}.")
  if set(splits) != set(SPLITS):
    raise ValueError(f"write_corpus: splits has keys {sorted(splits)}; expected {list(SPLITS)}.")
  if (tokenizer == "sentencepiece") != (tokenizer_model is not None):
    raise ValueError("write_corpus: pass tokenizer_model iff tokenizer='sentencepiece'.")
  if tokenizer == "bytes" and vocab_size != BYTE_VOCAB_SIZE:
    raise ValueError(f"write_corpus: tokenizer='bytes' needs vocab_size=256; got {vocab_size}.")
  data_dir = Path(data_dir)
  data_dir.mkdir(parents=True, exist_ok=True)
  (data_dir / META_FILE).unlink(missing_ok=True)  # The dir is incomplete until meta is back.
  dtype = token_dtype(vocab_size)
  tmps, num_tokens, sha = {}, {}, {}
  try:
    for split in SPLITS:
      tmps[split], num_tokens[split], sha[split] = _write_split_tmp(
          data_dir, split, splits[split], dtype, vocab_size)
    for split in SPLITS:
      os.replace(tmps.pop(split), data_dir / f"{split}.bin")
  finally:
    for tmp in tmps.values():
      Path(tmp).unlink(missing_ok=True)
  model_name = None
  if tokenizer_model is not None:
    model_name = SP_MODEL_FILE
    _atomic_write_bytes(data_dir / model_name, tokenizer_model)
  fingerprint = hashlib.sha256(json.dumps(
      [FORMAT, tokenizer, vocab_size, dtype.str, sha,
       hashlib.sha256(tokenizer_model or b"").hexdigest()], sort_keys=True).encode()).hexdigest()
  meta = CorpusMeta(
      vocab_size=vocab_size, dtype=dtype.name, tokenizer=tokenizer, tokenizer_model=model_name,
      source=source, num_tokens=num_tokens, num_files=dict(num_files or {}), sha256=sha,
      fingerprint=fingerprint, path=data_dir)
  _atomic_write_bytes(data_dir / META_FILE, meta.to_json().encode())
  return meta


def read_meta(data_dir: str | os.PathLike) -> CorpusMeta:
  """Reads and checks `data_dir/meta.json`; errors say how to create the corpus."""
  data_dir = Path(data_dir)
  if not data_dir.is_dir():
    raise ValueError(
        f"data_dir={str(data_dir)!r} does not exist. Create a corpus with `{PREPARE_HINT}` "
        "or use the default stdlib corpus (data_dir=None)."
    )
  meta_path = data_dir / META_FILE
  if not meta_path.is_file():
    raise ValueError(
        f"data_dir={str(data_dir)!r} has no {META_FILE}: not a corpus, or its writing was "
        f"interrupted. Re-create it with `{PREPARE_HINT}`."
    )
  d = json.loads(meta_path.read_text())
  if d.get("format") != FORMAT:
    raise ValueError(
        f"{meta_path}: format={d.get('format')!r}, expected {FORMAT!r}; re-create the corpus "
        f"with `{PREPARE_HINT}`."
    )
  return CorpusMeta(**d, path=data_dir)


def load_split(data_dir: str | os.PathLike, split: str) -> np.ndarray:
  """Memory-maps the 1-D token ids of `split` ("train" or "val") read-only."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; expected one of {SPLITS}.")
  meta = read_meta(data_dir)
  path = Path(data_dir) / f"{split}.bin"
  dtype = np.dtype(meta.dtype).newbyteorder("<")
  want = meta.num_tokens[split] * dtype.itemsize
  got = path.stat().st_size if path.is_file() else None
  if got != want:
    raise ValueError(
        f"{path}: size {got} bytes, but {META_FILE} says {meta.num_tokens[split]} {meta.dtype} "
        f"tokens ({want} bytes); the corpus is corrupt, re-create it with `{PREPARE_HINT}`."
    )
  if want == 0:
    return np.zeros((0,), dtype)
  return np.memmap(path, dtype=dtype, mode="r", shape=(meta.num_tokens[split],))


@functools.lru_cache(maxsize=8)
def _sp_processor(model_path: str):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  return spm.SentencePieceProcessor(model_file=model_path)


def encode(text: str, meta: CorpusMeta) -> np.ndarray:
  """Token ids `(T,)` int32 of `text` with the corpus tokenizer (no `</s>` appended)."""
  if meta.tokenizer == "bytes":
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
  return np.asarray(_sp_processor(str(meta.tokenizer_model_path)).encode(text), np.int32)


def decode(tokens: Sequence[int] | np.ndarray, meta: CorpusMeta) -> str:
  """Text of token ids; invalid utf-8 (e.g. a window cut inside a character) becomes U+FFFD."""
  tokens = np.asarray(tokens).reshape(-1)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= meta.vocab_size):
    raise ValueError(
        f"decode: token ids span [{tokens.min()}, {tokens.max()}], outside "
        f"[0, vocab_size={meta.vocab_size}); was the model trained with another vocabulary?"
    )
  if meta.tokenizer == "bytes":
    return tokens.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
  return _sp_processor(str(meta.tokenizer_model_path)).decode(tokens.tolist())


def is_val_file(relpath: str, val_fraction: float) -> bool:
  """Deterministic file-level split: the sha256 of the relative path, as a number in [0, 1)."""
  h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big")
  return h / 2.0**64 < val_fraction


def split_files(relpaths: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """`(train, val)` relative paths, each sorted; both non-empty when there are >= 2 files.

  With no file hashed into val, the file with the smallest hash goes there (deterministic).
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction}; expected a value in (0, 1), e.g. 0.05.")
  relpaths = sorted(relpaths)
  val = [p for p in relpaths if is_val_file(p, val_fraction)]
  if not val and len(relpaths) >= 2:
    val = [min(relpaths, key=lambda p: hashlib.sha256(p.encode()).digest())]
  if len(val) == len(relpaths) and len(relpaths) >= 2:
    val = val[:-1]
  val_set = set(val)
  return [p for p in relpaths if p not in val_set], val


def stdlib_files() -> tuple[Path, list[str]]:
  """`(root, sorted relative paths)` of the stdlib `*.py` files, without site/dist-packages."""
  root = Path(sysconfig.get_paths()["stdlib"])
  relpaths = []
  for dirpath, dirnames, filenames in os.walk(root):  # Does not follow symlinked dirs.
    dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
    rel = Path(dirpath).relative_to(root)
    relpaths += [(rel / f).as_posix() for f in filenames if f.endswith(".py")]
  return root, sorted(relpaths)


def default_cache_dir() -> Path:
  """`$MHC_JAX_CACHE`, else `$XDG_CACHE_HOME/mhc_jax`, else `~/.cache/mhc_jax`."""
  if os.environ.get("MHC_JAX_CACHE"):
    return Path(os.environ["MHC_JAX_CACHE"])
  xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(xdg) / "mhc_jax"


def _read_bytes_tokens(root: Path, relpaths: Sequence[str]) -> Iterable[np.ndarray]:
  for rel in relpaths:
    yield np.frombuffer((root / rel).read_bytes(), np.uint8)


def ensure_stdlib_corpus(cache_dir: str | os.PathLike | None = None) -> Path:
  """Builds (once) and returns the byte-level corpus of this interpreter's stdlib `*.py` files.

  The directory is `cache_dir/stdlib-<major.minor.micro>-<fingerprint>`, where the fingerprint
  hashes the file list and sizes, so a different Python gets its own corpus; a second call finds
  `meta.json` and returns at once. Safe against crashes (atomic writes); with several processes on
  a shared filesystem, let one build it before the others call this.
  """
  root, relpaths = stdlib_files()
  if not relpaths:
    raise ValueError(f"ensure_stdlib_corpus: no *.py files under the stdlib {root}; pass "
                     f"data_dir= a corpus made with `{PREPARE_HINT}`.")
  listing = hashlib.sha256()
  for rel in relpaths:
    listing.update(f"{rel}\t{(root / rel).stat().st_size}\n".encode())
  listing.update(f"{FORMAT} {STDLIB_VAL_FRACTION}".encode())
  version = ".".join(map(str, sys.version_info[:3]))
  out = Path(cache_dir or default_cache_dir()) / f"stdlib-{version}-{listing.hexdigest()[:12]}"
  if (out / META_FILE).is_file():
    return out
  train, val = split_files(relpaths, STDLIB_VAL_FRACTION)
  write_corpus(
      out, {"train": _read_bytes_tokens(root, train), "val": _read_bytes_tokens(root, val)},
      vocab_size=BYTE_VOCAB_SIZE, tokenizer="bytes",
      source=f"Python {version} stdlib *.py under {root} (site/dist-packages excluded); "
             f"val = files with sha256(relpath) < {STDLIB_VAL_FRACTION}",
      num_files={"train": len(train), "val": len(val)})
  return out
