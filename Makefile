# The two commands of README.md: `make demo` (the main job) and `make test`.
# Both create .venv (seeing the system's packages, so a torch you already have is kept),
# install torch==2.13.0 only when no torch can be imported, then install this package.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-igpt

.PHONY: install test test-fast lint format bench demo gpu-check compile-report mutation clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)  # csrc: rebuild igpt_kernels._C
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

test: install  # everything (about 8 minutes on 2 CPU cores; cuda tests skip without a GPU)
	$(PY) -m pytest -q

test-fast: install  # the inner loop: leaves out the tests marked slow (each over ~5-10 s)
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Every Triton kernel and config compiled for sm_90a and sm_80 (no GPU needed): the table
# of registers, spills, shared memory and MMA instructions, into benchmarks/RESULTS.md.
compile-report: install
	env -u TRITON_INTERPRET $(PY) benchmarks/compile_report.py --results benchmarks/RESULTS.md

bench: install
	$(VENV)/bin/igpt bench

demo: install
	$(VENV)/bin/igpt demo --out runs/demo

# Mutation testing (not part of `make test` or CI; a nightly-style job): mutmut over each
# module with its own tests, BUDGET seconds per module, the scores into TESTING.md.
# make mutation MODULES="training generation" BUDGET=300  (see TESTING.md, tools/mutation.py)
MODULES ?=
BUDGET  ?= 300
mutation: install
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q "mutmut==3.8.1"
	$(PY) tools/mutation.py $(MODULES) --budget $(BUDGET) --write TESTING.md

gpu-check:  # on a GPU machine: cuda tests + every benchmark, results under $$OUT (see the script)
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache
