# The two commands in the README: `make demo` and `make test`. Both run scripts/setup.sh first, which
# installs what is missing into the current Python environment (idempotent, quick when done).
PYTHON ?= python3
export PYTHON

.PHONY: setup demo test bench
setup:
	@bash scripts/setup.sh

demo: setup
	$(PYTHON) -m proxytune demo

test: setup
	$(PYTHON) -m pytest

bench: setup
	$(PYTHON) -m pytest benchmarks
