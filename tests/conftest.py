"""Fixtures shared by the end-to-end tests: a private corpus cache, a compilation cache, and the
reference runs that several modules read (made once per session, even under pytest-xdist)."""

import fcntl
import json
import os
import shutil

import jax
from jax.experimental.compilation_cache import compilation_cache
import pytest

from mhc_jax.training import corpus, train
from tests import helpers


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """A stdlib corpus cache private to this test session (built once per worker)."""
  path = tmp_path_factory.mktemp("mhc_jax_cache")
  corpus.ensure_stdlib_corpus(path)
  return path


def _session_dir(tmp_path_factory):
  """This session's tmp dir, shared by its pytest-xdist workers (each has a subdirectory)."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent JAX compilation cache for this module, in-process and for child processes.

  Shared by the workers; JAX treats an unreadable entry as a miss, so races cost a recompile.
  """
  path = _session_dir(tmp_path_factory) / "jax_compile_cache"
  path.mkdir(exist_ok=True)
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(path))
  compilation_cache.reset_cache()  # Takes effect even if this process compiled before.
  yield path
  jax.config.update("jax_compilation_cache_dir", old)
  compilation_cache.reset_cache()


def _shared_run(tmp_path_factory, cache_dir, name, overrides):
  """`(workdir, scalars)` of one in-process run of `helpers.smoke_config(cache_dir, overrides)`,
  made once per
  session: the first worker to take the lock trains, the others wait. Tests only read it."""
  root = _session_dir(tmp_path_factory)
  workdir, done = root / name, root / f"{name}_scalars.json"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.is_file():
        shutil.rmtree(workdir, ignore_errors=True)
        scalars = train.train_and_evaluate(helpers.smoke_config(cache_dir, overrides), str(workdir))
        done.write_text(json.dumps(scalars))
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return workdir, json.loads(done.read_text())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cache_dir, compile_cache):
  """The `:smoke` config as it is."""
  del compile_cache  # Only ordering: runs compile into the cache.
  return _shared_run(tmp_path_factory, cache_dir, "smoke_run", {})


@pytest.fixture(scope="module")
def resume_run(tmp_path_factory, cache_dir, compile_cache):
  """`:smoke` with `helpers.RESUME`, uninterrupted on this process's devices."""
  del compile_cache
  return _shared_run(tmp_path_factory, cache_dir, "resume_run", helpers.RESUME)
