# Two commands on a fresh machine:  `make serve`  and  `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .
	# animal-mnist's declared deps (tensorflow) are only for its own loader; we read its data file directly.
	$(BIN)/pip install -q --no-deps animal-mnist==0.4

install-test: install
	$(BIN)/pip install -q -e '.[test]'

serve: install
	$(BIN)/python -m app serve --host $${HOST:-127.0.0.1} --port $${PORT:-8000}

test: install-test
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

.PHONY: install install-test serve test
