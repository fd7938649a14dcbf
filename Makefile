# Two commands for a newcomer on a fresh CPU machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 is the CPU wheel; any other pin pulls CUDA builds (GBs).
	$(BIN)/pip install -q torch==2.13.0 megatron-core==0.16.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/toy/run.py

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30 tests

clean:
	rm -rf $(VENV) runs
