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
# Optional (about 4.5 GB): JAX's CUDA plugin, for compile-only H100 builds. `make test` runs the
# H100 compile tests when it exists and skips them, saying so, when it does not.
CUDA_VENV := .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_STAMP := $(CUDA_VENV)/.installed
# Each venv installs the versions its Python was tested with, when constraints/ pins them
# (`-c constraints/py<major>.<minor>.txt`); other Pythons get the newest within pyproject's bounds.
CONSTRAIN := import os, sys; f = "constraints/py%d.%d.txt" % sys.version_info[:2]; print("-c " + f if os.path.exists(f) else "")
SAY_VERSIONS := import sys, jax; print(f"{sys.prefix}: Python {sys.version.split()[0]}, jax {jax.__version__}")

.PHONY: train test venv tpu-venv cuda-venv compile compile-check clean

$(STAMP): pyproject.toml $(wildcard constraints/*.txt)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $$($(PY) -c '$(CONSTRAIN)') -e '.[test]'
	@$(PY) -c '$(SAY_VERSIONS)'
	touch $(STAMP)

$(TPU_STAMP): pyproject.toml $(wildcard constraints/*.txt)
	test -x $(TPU_PY) || $(PYTHON) -m venv $(TPU_VENV)
	$(TPU_PY) -m pip install -q --upgrade pip
	$(TPU_PY) -m pip install -q $$($(TPU_PY) -c '$(CONSTRAIN)') -e '.[tpu]'
	@$(TPU_PY) -c '$(SAY_VERSIONS)'
	touch $(TPU_STAMP)

$(CUDA_STAMP): pyproject.toml $(wildcard constraints/*.txt)
	test -x $(CUDA_PY) || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q --upgrade pip
	$(CUDA_PY) -m pip install -q $$($(CUDA_PY) -c '$(CONSTRAIN)') -e '.[cuda]'
	@$(CUDA_PY) -c '$(SAY_VERSIONS)'
	touch $(CUDA_STAMP)

venv: $(STAMP)

tpu-venv: $(TPU_STAMP)

cuda-venv: $(CUDA_STAMP)

train: $(STAMP)
	$(PY) -m launch.train --config=configs/default.py --workdir=runs/default

test: $(STAMP) $(TPU_STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -n 2 --durations=25 tests

# The default model's train step, compiled for a 4-chip v5p slice (v5p-8) from this host.
compile: $(TPU_STAMP)
	$(TPU_PY) -m launch.compile --config=configs/default.py --target=v5p-8

# Every mHC kernel, forward and VJP, compiled by the real compilers: TPU v5e, v5p, v6e (Mosaic),
# and H100 (Triton, ptxas) when .venv-cuda exists; bfloat16 and float32, n in {2, 4, 8},
# C in {128, 1280, 2560}, 4 x 4096 tokens. About 10 min for the TPUs, 5 for the H100.
compile-check: $(TPU_STAMP)
	$(TPU_PY) -m launch.compile_kernels --targets=v5e-4,v5p-8,v6e-4
	if [ -x $(CUDA_PY) ]; then $(CUDA_PY) -m launch.compile_kernels --targets=h100; \
	else echo "no $(CUDA_VENV): H100 skipped (make cuda-venv, about 4.5 GB)"; fi

clean:
	rm -rf $(VENV) $(TPU_VENV) $(CUDA_VENV) runs
