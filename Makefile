# The README's two commands are `make run` and `make test`.
PY := .venv/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= models/cifar10
EXTRAS_TEST := cpu,train,dev,loadtest
PYTEST_ARGS ?=

.PHONY: run test test-fast lint typecheck venv-serve venv-test system bench bench-train

run: venv-serve ## serve the shipped default model on http://$(HOST):$(PORT)
	.venv/bin/fractal serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: system venv-test lint typecheck ## everything CI runs: lint, types, the whole suite
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: venv-test lint typecheck ## quick local loop: no slow tests
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck:
	.venv/bin/mypy model service loadtest fractal tests

venv-serve:
	scripts/install-venv.sh cpu

venv-test:
	scripts/install-venv.sh $(EXTRAS_TEST)

system:
	scripts/install-system.sh

bench: venv-test
	.venv/bin/fractal bench --model $(MODEL)

bench-train: venv-test
	.venv/bin/fractal bench-train
