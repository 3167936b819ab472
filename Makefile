# Two entry points for a fresh machine: `make demo` and `make test`.
#
# LOCK is the exact set of versions installed (CPU build of torch, vLLM's CPU build);
# refresh it with `make lock`. On a GPU machine, `make LOCK= test` installs from the
# ranges in pyproject.toml instead, with the `vllm` extra.
PYTHON ?= python3
VENV ?= .venv
LOCK ?= requirements/cpu.lock
PIP_VERSION = 26.3
UV_VERSION = 0.13.9
# Where the lock resolver finds torch 2.13.0+cpu: this machine keeps the wheel in /opt/wheels;
# elsewhere use TORCH_CPU_SOURCE="--extra-index-url https://download.pytorch.org/whl/cpu".
TORCH_CPU_SOURCE ?= --find-links /opt/wheels

$(VENV)/.installed: pyproject.toml $(LOCK)
	@$(MAKE) --no-print-directory system-deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q pip==$(PIP_VERSION)
ifneq ($(LOCK),)
	$(VENV)/bin/pip install -q --no-deps -r $(LOCK)
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
else
	$(VENV)/bin/pip install -q -e ".[dev,vllm]"
endif
	touch $@

# System packages: bubblewrap runs model-written code in a sandbox (the python_tests filter).
system-deps:
	@command -v bwrap >/dev/null || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then apt-get install -y -q bubblewrap >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; }; \
	  else echo "missing: bubblewrap (bwrap). Install it: apt-get install bubblewrap / dnf install bubblewrap" >&2; exit 1; fi; }

install: $(VENV)/.installed

# The suite runs in TEST_WORKERS pytest-xdist processes, a test file per process at a time (its module
# fixtures and the session's shared Ray stay within one process). Two keep two cores busy.
TEST_WORKERS ?= 2

# The package is byte-compiled first: where PYTHONDONTWRITEBYTECODE is set, each of the few hundred processes
# the suite starts (drivers, actors, filter processes) would otherwise compile it from source again.
test: install
	$(VENV)/bin/python -m compileall -q iterft_ray
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: install
	$(VENV)/bin/iterft demo

# On a GPU machine whose Python has torch + CUDA, transformers, peft, accelerate and pyarrow but
# neither Ray nor vLLM: no install (it would bring Ray), the checkout's iterft_ray on PYTHONPATH.
gpu-check:
	PYTHONPATH=. $(PYTHON) jobs/gpu_check.py

# Re-resolve requirements/cpu.lock from pyproject.toml and requirements/cpu.in (Linux x86_64, Python 3.11).
lock:
	$(PYTHON) -m venv /tmp/iterft-uv && /tmp/iterft-uv/bin/pip install -q uv==$(UV_VERSION)
	/tmp/iterft-uv/bin/uv pip compile pyproject.toml requirements/cpu.in --extra dev -o requirements/cpu.lock \
	  --python-version 3.11 $(TORCH_CPU_SOURCE) --index-strategy unsafe-best-match \
	  --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec

.PHONY: install system-deps test demo lock gpu-check
