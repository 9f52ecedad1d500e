# Two commands for a fresh clone: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench ui docs notebooks install clean

install: $(STAMP)

# Reinstall when the declared dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,notebooks]'
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@$(BIN)/python -m pipeline summary

# Formatting, lint and types first: a quick failure before the 12-minute suite.
lint: $(STAMP)
	$(BIN)/ruff format --check pipeline benchmarks tests
	$(BIN)/ruff check pipeline benchmarks tests
	$(BIN)/mypy pipeline benchmarks

test: $(STAMP) lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=12   # two workers, a test file each; the slowest listed (12-minute budget)

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m benchmarks

# The store named in params.yaml (mlflow.tracking_uri), unless MLFLOW_TRACKING_URI says otherwise.
# The link opens the experiment's runs table (MLflow 3 would otherwise open its GenAI overview).
ui: $(STAMP)
	@uri="$${MLFLOW_TRACKING_URI:-$$($(BIN)/python -c 'from pipeline.config import load; print(load().mlflow.tracking_uri)')}" && \
	  link="$$($(BIN)/python -m pipeline tracking --tracking-uri "$$uri")" && \
	  echo "MLflow UI, runs table: $$link  (Ctrl-C to stop)" && \
	  $(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri "$$uri"

# JupyterLab on 127.0.0.1 over notebooks/ (explore the data, compare runs, error analysis); see docs/notebooks.md.
notebooks: $(STAMP)
	$(BIN)/jupyter lab --ip 127.0.0.1 --notebook-dir notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

# docs/configuration.md from the typed params in pipeline/config.py (tests/test_docs.py checks it is current).
docs: $(STAMP)
	$(BIN)/python -m pipeline docs

clean:
	rm -rf data/prepared data/augment data/tune models reports
