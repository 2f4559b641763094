# graft: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: install lint demo test test-fast repro retrain retrain-flow deploy clean

# constraints.txt pins the tested torch/torchvision builds; pyproject.toml keeps compatible ranges.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,lint,lite]'
	touch $@

install: $(VENV)/.installed

## demo: digits -> Lite0 features -> head -> metrics vs raw-pixel baseline -> ONNX (a few minutes on 2 cores)
demo: install
	@start=$$(date +%s); \
	test -d data/raw || graft demo-data --out data/raw; \
	dvc repro && graft metrics && echo "demo finished in $$(( $$(date +%s) - start )) s"

## lint: ruff (rules and format) and mypy, configured in pyproject.toml
lint: install
	ruff check
	ruff format --check
	mypy

## test: lint, then the whole suite, including the end-to-end `dvc repro` with the real Lite0 weights.
## pytest-xdist runs it on every core (at most 4 workers; each worker has its own Prefect test server).
PYTEST_WORKERS ?= -n auto --maxprocesses=4
test: lint
	pytest -q $(PYTEST_WORKERS)

## test-fast: unit tests only (skips the slow end-to-end and real-weights tests)
test-fast: install
	pytest -q $(PYTEST_WORKERS) -m "not slow"

repro: install
	dvc repro

## retrain: what CI does on new data: reproduce, diff metrics against git, fail if the gate fails
GATE_AGAINST ?= HEAD
retrain: install
	dvc repro
	dvc metrics diff $(GATE_AGAINST) --md
	graft gate --against $(GATE_AGAINST)

## retrain-flow: the Prefect retrain flow (champion/challenger in models/, history in models/history.parquet)
retrain-flow: install
	graft retrain

## deploy: serve the pipeline and retrain flows on the cron in params.yaml (needs `prefect server start`)
deploy: install
	python -m graft.flows.deploy --params params.yaml

clean:
	rm -rf data/features.parquet data/manifest.parquet data/classes.json data/quarantine.csv \
	       models metrics plots reports dvc_plots
