# The two entry points of the README: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo ui test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU wheel on disk: a bare requirement would pull a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# .[edge]: ExecuTorch and ONNX Runtime, so that the export tests run too
	$(BIN)/python -m pip install -q -e '.[test,edge]'
	touch $(STAMP)

install: $(STAMP)

# The whole study in miniature: synthetic PulseDB, pretraining, the grid on local Ray, INT8
# variants, summary; MLflow store in .bpfm/mlflow.db (`make ui` opens it).
demo: install
	$(BIN)/python pipelines/grid.py --profile demo

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.bpfm/mlflow.db --host 127.0.0.1

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf .bpfm
