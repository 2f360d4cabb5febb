# Two commands matter: `make serve` and `make test`. Everything else is a step they use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch 2.14.1 + torchvision 0.29.1 are what this project is tested with; pinning them here
# keeps pip from resolving a newer torch (a multi-gigabyte download).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install serve demo test lint typecheck unit proto proto-check train-demo bench clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e ./clients/python
	$(BIN)/python -m pip install -q -e '.[dev,tracing]' $(TORCH_PINS)
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/moderator serve

demo: $(STAMP)
	$(BIN)/moderator serve --demo

proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py

proto-check: $(STAMP)
	$(BIN)/python tools/gen_proto.py --check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: proto-check lint typecheck unit

train-demo: $(STAMP)
	$(BIN)/python tools/train_shapes_clip.py

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
