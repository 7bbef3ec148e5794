# Quickstart: `make demo` (runs the default few-shot job) and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: demo test test-all docs venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned, so pip never resolves a CUDA build; then the package with dev extras.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/promptdelta run --config examples/configs/demo.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -x --timeout=600

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m '' --timeout=1800

# the guide + references into site/ (warnings fail the build)
docs: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build site *.egg-info
