# The two fresh-machine entry points are `make demo` and `make test`; both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast bench clean

$(BIN)/lrp-audit: pyproject.toml requirements-oracles.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps -r requirements-oracles.txt  # test oracles; why without deps: see the file
	touch $@

demo: $(BIN)/lrp-audit
	$(BIN)/lrp-audit demo --out demo-out

test: $(BIN)/lrp-audit
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/lrp-audit
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(BIN)/lrp-audit
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
