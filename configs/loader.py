"""The one place that loads a config file, and the variant parser every config file uses.

A config spec is `path[:arg]` (`configs/default.py:hc,n=2`) or, for a file of this package, its
name (`default:hc,n=2`). `arg` is what the file's `get_config(arg)` receives: a comma-separated
list that `parse_arg` reads into presets (bare words, applied in order) and typed `key=value`
settings, in the manner of big_vision's `parse_arg`.
"""

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import ml_collections

CONFIG_DIR = Path(__file__).resolve().parent


def _module(path: str):
  """The config module at `path` (a file, or the name of one in configs/)."""
  file = Path(path if path.endswith(".py") else CONFIG_DIR / f"{path}.py").resolve()
  if not file.is_file():
    raise ValueError(f"config file {path!r} does not exist; pass a path such as "
                     "configs/default.py (with an optional :variants suffix).")
  if file.parent == CONFIG_DIR:
    return importlib.import_module(f"configs.{file.stem}")
  spec = importlib.util.spec_from_file_location(f"_mhc_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a `path[:arg]` config spec."""
  path, _, arg = spec.partition(":")
  return _module(path).get_config(arg or None)


def _typed(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"config argument {key}={text!r}: expected true or false.")
    return text.lower() in ("true", "1")
  try:
    return type(default)(text)
  except ValueError:
    raise ValueError(f"config argument {key}={text!r}: expected a {type(default).__name__}."
                     ) from None


def parse_arg(arg: str | None, *, presets: tuple[str, ...] = (), example: str = "",
              **defaults: Any) -> ml_collections.ConfigDict:
  """Reads `get_config`'s comma-separated `arg`.

  Bare words must be among `presets` and come back, in order, as `.presets`; `key=value` sets
  a field of `defaults`, converted to its default's type. Anything else raises a `ValueError`
  naming the word and what is accepted (`example`: a spec to show).
  """
  out = ml_collections.ConfigDict(dict(defaults))
  chosen = []
  for word in filter(None, (w.strip() for w in (arg or "").split(","))):
    key, eq, text = word.partition("=")
    if eq and key in defaults:
      out[key] = _typed(key, text, defaults[key])
    elif not eq and word in presets:
      chosen.append(word)
    else:
      accepted = [*presets, *(f"{k}=<{type(v).__name__}>" for k, v in defaults.items())]
      raise ValueError(f"config argument {word!r} is unknown: use {', '.join(accepted)}, comma "
                       f"separated{f' (e.g. {example})' if example else ''}.")
  out.presets = tuple(chosen)
  return out
