"""What the `launch.*` entry points share: a config-flag parser with clear errors, quiet logs.

A bad `--config.<field>=...` override ends in one `error:` line instead of a traceback.

`ml_collections.config_flags` applies the overrides while absl parses the flags, before `main`
runs, and a misspelt field surfaces as an `AttributeError` traceback. `parse_flags` (for
`app.run(main, flags_parser=parse_flags)`) catches it, finds the first override whose path does not
exist in the config file, and names it with the nearest known field.
"""

import difflib
import logging
import sys

from absl import app
import ml_collections

from configs.loader import load_config


def unknown_override(argv: list[str], default_spec: str) -> str | None:
  """A sentence naming the first `--config.a.b=v` whose path is not in the config, or None."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), default_spec)
  try:
    config = load_config(spec)
  except Exception:  # pylint: disable=broad-except  (the caller falls back to the original error)
    return None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    dotted = arg[len("--config."):].split("=", 1)[0]
    node, known = config, []
    for part in dotted.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        nearest = difflib.get_close_matches(part, fields, n=1)
        where = "config" + "".join(f".{k}" for k in known)
        hint = (f"did you mean --{where}.{nearest[0]}?" if nearest else
                f"known fields of {where}: {', '.join(fields) or '(none: it is a value)'}.")
        return f"--config.{dotted}: {where} has no field {part!r}; {hint}"
      node = node[part]
      known.append(part)
  return None


def make_parser(default_spec: str):
  """A flags parser for `app.run` whose config override errors are one line on stderr."""
  def parse_flags(argv: list[str]) -> list[str]:
    try:
      return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      print(f"error: {unknown_override(argv, default_spec) or e}", file=sys.stderr)
      sys.exit(1)
  return parse_flags


class QuietLibraries:
  """A log filter dropping INFO records of installed libraries (Orbax logs every save step)."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "site-packages" not in record.pathname
