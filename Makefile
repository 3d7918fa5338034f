# Two commands do all the set-up: `make train` and `make test` (each creates .venv when missing).
# `make test` also creates .venv-tpu: libtpu, for compile-only TPU builds (`launch.compile`). It
# lives in its own environment so that the main one never tries to start a TPU runtime.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TPU_VENV := .venv-tpu
TPU_PY := $(TPU_VENV)/bin/python
TPU_STAMP := $(TPU_VENV)/.installed

.PHONY: train test venv tpu-venv compile clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

$(TPU_STAMP): pyproject.toml
	test -x $(TPU_PY) || $(PYTHON) -m venv $(TPU_VENV)
	$(TPU_PY) -m pip install -q --upgrade pip
	$(TPU_PY) -m pip install -q -e '.[tpu]'
	touch $(TPU_STAMP)

venv: $(STAMP)

tpu-venv: $(TPU_STAMP)

train: $(STAMP)
	$(PY) -m launch.train --config=configs/default.py --workdir=runs/default

test: $(STAMP) $(TPU_STAMP)
	$(PY) -m pytest -n 2 tests

# The default model's train step, compiled for a 4-chip v5p slice (v5p-8) from this host.
compile: $(TPU_STAMP)
	$(TPU_PY) -m launch.compile --config=configs/default.py --target=v5p-8

clean:
	rm -rf $(VENV) $(TPU_VENV) runs
