"""`launch.sample` and `launch.report` on a trained run."""

import sys

import pytest

from tests import helpers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("compile_cache")


# --- sampling and the report ------------------------------------------------------------------


def test_launch_sample_prints_text(smoke_run, cache_dir):
  prompt = "def "
  proc = helpers.run([sys.executable, "-m", "launch.sample", f"--workdir={smoke_run[0]}",
               f"--prompt={prompt}", "--max_new_tokens=16", "--temperature=0"], cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith(prompt)
  assert len(proc.stdout.rstrip("\n")) > len(prompt)  # 16 bytes decode to at least 4 chars


def test_launch_report_writes_png(smoke_run, tmp_path, cache_dir):
  out = tmp_path / "report.png"
  proc = helpers.run([sys.executable, "-m", "launch.report", f"--workdir={smoke_run[0]}",
               f"--out={out}"], cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == str(out)
  assert out.read_bytes().startswith(PNG_MAGIC)
