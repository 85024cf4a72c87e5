# Two commands for a newcomer: `make demo` (Multi30k recipe, demo size) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# Offline machines: read corpora from a local mirror when one sits beside the checkout.
MIRROR := $(wildcard $(abspath ../shared/corpora))
ifneq ($(MIRROR),)
export NMT_MIRROR ?= $(MIRROR)
endif

.PHONY: venv test test-slow lint demo bench clean

$(BIN)/nmt: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/nmt

lint: venv
	$(BIN)/ruff check nmt tests recipes data_scripts benchmarks
	$(BIN)/ruff format --check nmt tests recipes data_scripts benchmarks

test: lint
	$(BIN)/pytest -q

test-slow: venv
	$(BIN)/pytest -q -m slow

demo: venv
	$(BIN)/python recipes/multi30k.py --preset demo

bench: venv
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/decode_speed.py

clean:
	rm -rf $(VENV) runs
