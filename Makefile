# Two commands do everything on a fresh machine: `make bench` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: bench bench-full test test-fast lint venv clean

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

bench: $(STAMP)
	$(PY) -m torchderiv bench --quick --json bench-results/bench.json --plot bench-results/speedups.png

bench-full: $(STAMP)
	$(PY) -m torchderiv bench --json bench-results/bench-full.json --plot bench-results/speedups-full.png

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples

# everything (what CI runs), two worker processes of one thread each (tests/conftest.py)
test: lint
	$(PY) -m pytest -q -n 2

# everything not marked slow: for iterating (a sample of each long parametrization, see tests/_harness.py:sampled);
# whole files per worker (--dist loadfile): the references a file's tests share are computed in one process, not
# both (make test keeps test-by-test balancing: there one file, test_compile.py, alone takes about 85 s of CPU)
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) bench-results .pytest_cache
