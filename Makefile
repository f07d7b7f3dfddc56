# neuroflow: `make demo` and `make test` each set everything up from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONPATH := $(CURDIR)

.PHONY: install browser demo test test-fast reliability bench clean

install: $(STAMP)

# Exact pins (requirements.lock) for every package, torch on the CPU wheel; then the
# project itself, editable, without touching those pins.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Debian's chromium, for the tests that open the report in a real browser.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Faults injected and bad inputs tried; prints the table (also part of `make test`).
reliability: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m reliability

# Speed and memory, measured on this machine: tables in bench/results/ (about 2 hours on 2 cores).
bench: $(STAMP)
	$(BIN)/python bench/bench_fit.py --out bench/results/fit.md
	$(BIN)/python bench/bench_banded.py --out bench/results/banded.md
	$(BIN)/python bench/bench_features.py --out bench/results/features.md
	$(BIN)/python bench/bench_responses.py --targets 80000 --out bench/results/responses.md
	$(BIN)/python bench/bench_scale.py --out bench/results/scale.md
	$(BIN)/python bench/bench_memory.py --out bench/results/memory.md
	$(BIN)/python bench/bench_permutation_level.py --out bench/results/permutation-level.md
	$(BIN)/python bench/bench_group.py --out bench/results/group.md
	$(BIN)/python bench/bench_sweep.py --out bench/results/sweep.md
	$(BIN)/python bench/bench_llm.py --device cpu --models gpt2-small --words 1500 --out bench/results/llm.md
	$(BIN)/python bench/bench_layer_curve.py --out bench/results/layer-curve.md
	$(BIN)/python bench/bench_cohort.py --out bench/results/cohort.md
	$(BIN)/python bench/bench_models.py --out bench/results/models.md
	$(BIN)/python bench/bench_viewers.py --out bench/results/viewers.md
	$(BIN)/python bench/bench_semantic_decoding.py --out bench/results/semantic-decoding.md

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .demo demo-output .airflow
