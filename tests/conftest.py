"""Fixtures shared by the end-to-end tests."""

import pytest

from mhc_jax import corpus


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """A stdlib corpus cache private to this test session (built once per worker)."""
  path = tmp_path_factory.mktemp("mhc_jax_cache")
  corpus.ensure_stdlib_corpus(path)
  return path
