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

# Figures as JSON in runs/bench; run on a quiet machine. Decoding needs the small recipe's model
# (python recipes/multi30k.py --preset small).
BENCH := runs/bench
SMALL := runs/multi30k_en_de_small
bench: venv
	mkdir -p $(BENCH)
	$(BIN)/python recipes/multi30k.py --preset small --end-stage prepare
	$(BIN)/python benchmarks/train_speed.py configs/gnmt_small.yaml --data-dir $(SMALL)/data \
	    --json $(BENCH)/train_gnmt_small.json
	$(BIN)/python benchmarks/train_speed.py configs/tcn_small.yaml --data-dir $(SMALL)/data \
	    --json $(BENCH)/train_tcn_small.json
	$(BIN)/python benchmarks/train_speed.py configs/gnmt_small.yaml --synthetic \
	    --json $(BENCH)/train_gnmt_small_wmt_lengths.json
	$(BIN)/python benchmarks/data_speed.py --pairs 100000 --max-tokens 3000 \
	    --json $(BENCH)/data.json
	@if [ -f $(SMALL)/model/best.pt ]; then \
	    $(BIN)/python benchmarks/decode_speed.py $(SMALL)/model/best.pt --latency 1000 \
	        --src $(SMALL)/raw/test_2016_flickr.en --json $(BENCH)/decode_gnmt_small.json; \
	else echo "decode_speed: no $(SMALL)/model/best.pt; train it first"; fi

clean:
	rm -rf $(VENV) runs
