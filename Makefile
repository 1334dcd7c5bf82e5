PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lint test test-fast demo bench bench-deploy bench-search clean

$(STAMP): pyproject.toml setup.py constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check mexify tests benchmarks examples
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash examples/demo.sh

bench: $(STAMP)
	for b in convert calibrate train policies runtime zoo; do $(BIN)/python benchmarks/bench_$$b.py || exit 1; done

bench-deploy: $(STAMP)
	test -f out/demo/lraspp.mex/config.yaml || $(MAKE) demo
	$(BIN)/python benchmarks/bench_deploy.py

bench-search: $(STAMP)
	test -f out/demo/lraspp.mex/config.yaml || $(MAKE) demo
	$(BIN)/python benchmarks/bench_search.py
	$(BIN)/python benchmarks/bench_search.py --layout folder

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
