# Everything a fresh machine needs lives here: `make quickstart` and `make test` set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel is pinned: an unpinned torch pulls gigabytes of CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup quickstart test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev,eval,finetune,serve,scale]'
	touch $@

setup: $(VENV)/.installed

# Task data at hand (../shared/data beside the repo) adds MMLU/GSM8K/HumanEval to the quickstart.
TASK_DATA ?= $(wildcard ../shared/data)

quickstart: setup
	$(BIN)/lmforge quickstart $(if $(TASK_DATA),--task-data $(TASK_DATA))

test: setup
	$(BIN)/python -m pytest tests

lint: setup
	$(BIN)/ruff check lmforge tests benchmarks

bench: setup
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/tokenizer_bench.py
	$(BIN)/python benchmarks/data_bench.py
	$(BIN)/python benchmarks/dedup_quality.py

clean:
	rm -rf $(VENV) runs *.egg-info
