# One command each on a fresh machine: `make demo`, `make test`, `make bench` (and `make corpus`).
# Each creates .venv with the pinned CPU set (constraints/cpu.txt) first; re-running is a no-op once installed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.growlm-installed
EXTRAS ?= dev,interop
WORKDIR ?= runs/demo
# Two workers (the machine's 2 cores), one test file per worker so module fixtures run once, the
# files in the order tests/conftest.py gives them (the longest first; xdist's own reorder, by
# number of tests, started the longest files last and left one worker idle at the end).
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder

CORPUS ?= runs/data/site-packages

.PHONY: install gpu-aot test test-fast demo bench corpus clean

install: $(STAMP)

# libtpu goes beside the environment (.venv/libtpu), out of jax's sight: only --compile_for (a TPU
# slice's train step compiled on this machine, growlm/train/aot.py) loads it.
$(STAMP): setup.cfg pyproject.toml constraints/cpu.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "growlm needs Python >= 3.11, got " + sys.version.split()[0]'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints/cpu.txt -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --no-deps --upgrade -c constraints/cpu.txt --target $(VENV)/libtpu libtpu
	touch $@

# XLA's CUDA compiler (a PJRT plugin) and cuDNN, beside the environment like libtpu and out of
# jax's sight: only benchmarks/gpu_traffic.py (a GPU's train step compiled on this machine) loads
# them. About 1 GB, so not part of install; `make bench` installs it.
gpu-aot: install $(VENV)/cuda-aot/.installed

$(VENV)/cuda-aot/.installed: constraints/cpu.txt
	$(PY) -m pip install -q --no-deps --upgrade -c constraints/cpu.txt --target $(VENV)/cuda-aot jax-cuda12-pjrt jax-cuda12-plugin nvidia-cudnn-cu12
	touch $@

test: install
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS) tests

demo: install
	$(PY) -m growlm.demo --workdir=$(WORKDIR)

bench: install gpu-aot
	$(PY) benchmarks/throughput.py --profile runs/bench/profile
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/growth.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/gpu_traffic.py --growth

# The larger local corpus (every installed package's .py files) as token shards; then train with
# --config.data.train=prepared:$(CORPUS). Rerunning resumes or does nothing.
corpus: install
	$(PY) -m growlm.prepare --source=site-packages --tokenizer=bytes --out=$(CORPUS)

clean:
	rm -rf runs .pytest_cache .hypothesis
