# fedge: `make demo` and `make test` work on a fresh machine; both set up what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedge-installed
PIP_VERSION := 26.3
PACKAGES := fedge fl_server fl_client secure_agg edge_runtime strategies simulations

export FLWR_TELEMETRY_ENABLED ?= 0
export FLWR_DISABLE_UPDATE_CHECK ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup data demo demo-fleet demo-scenarios test test-fast lint format typecheck check lock clean

## setup: create .venv and install fedge (editable, dev extra) at the pinned versions; fetch the data
setup: $(STAMP) data

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "fedge needs Python 3.11 (torch 2.13.0 wheel), found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "pip==$(PIP_VERSION)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

## data: make sure Fashion-MNIST is installed (Debian package dataset-fashion-mnist)
data:
	@scripts/ensure-data.sh

## demo: a 10-client federation on Fashion-MNIST (SecAgg+ and DP-SGD at epsilon 3), live, its signed
## variants, a device that verifies and serves one (drift check included), the audit trail, and the
## same devices declining a second run once their own lifetime budgets are spent, and the run's
## compliance report (HTML, PDF, JSON) checked against a signed audit checkpoint, and canary
## rollouts of a good and a badly calibrated INT8 variant to 200 simulated devices over MQTT, and
## a scenario file: 20 machines learning fault states from UCI Shuttle sensor readings (FedProx)
## (the demo's fedge home, its database, store and runs, is runs/demo/home, not ~/.fedge)
demo: export FEDGE_HOME := $(CURDIR)/runs/demo/home
demo: setup
	@# A fresh simulated fleet each time: a device's ledger spans its whole life, so devices
	@# that already spent epsilon 3 in an earlier demo would (rightly) decline every round.
	rm -rf runs/demo/devices
	$(BIN)/fedge sim run --secure-agg --dp sample --epsilon 3 --client-epsilon 3 --batch-size 128 --lr 0.1 \
		--variants final --devices-dir runs/demo/devices --out runs/demo/summary.json
	$(BIN)/fedge store variants cnn latest
	$(BIN)/fedge store verify cnn latest
	@echo "--- an edge device: verify and install the signed INT8 variant, then infer on it"
	$(BIN)/fedge store key --out runs/demo/store.pub
	rm -rf runs/demo/bundle && $(BIN)/fedge store export cnn latest runs/demo/bundle
	$(BIN)/fedge client models install runs/demo/bundle --store-key runs/demo/store.pub --cache-dir runs/demo/device
	$(BIN)/fedge sim samples --count 1000 --offset 5000 --out runs/demo/held-out.npz
	$(BIN)/fedge client infer cnn --input runs/demo/held-out.npz --store-key runs/demo/store.pub --cache-dir runs/demo/device
	$(BIN)/fedge sim samples --count 1000 --offset 6000 --brightness 0.25 --out runs/demo/brighter.npz
	$(BIN)/fedge client infer cnn --input runs/demo/brighter.npz --store-key runs/demo/store.pub --cache-dir runs/demo/device
	$(BIN)/fedge audit list --last 4
	$(BIN)/fedge audit verify
	@echo "--- the same devices in a new run: each has spent its lifetime epsilon 3 and declines (its own ledger)"
	$(BIN)/fedge sim run --secure-agg --dp sample --epsilon 3 --client-epsilon 3 --batch-size 128 --lr 0.1 --rounds 1 \
		--devices-dir runs/demo/devices --out runs/demo/second-run.json > runs/demo/second-run.log 2>&1
	$(BIN)/fedge client ledger --devices-dir runs/demo/devices --accountant prv
	@echo "--- the compliance report of the demo's run, its trail checked against a signed checkpoint kept outside"
	$(BIN)/fedge audit checkpoint --out runs/demo/audit-checkpoint.json
	$(BIN)/fedge audit verify --checkpoint runs/demo/audit-checkpoint.json
	run=$$($(BIN)/python -c 'import json; print(json.load(open("runs/demo/summary.json"))["run_id"])') && \
	$(BIN)/fedge audit report --run $$run --format html --out runs/demo/report.html && \
	$(BIN)/fedge audit report --run $$run --format pdf --out runs/demo/report.pdf && \
	$(BIN)/fedge audit report --run $$run --format json --out runs/demo/report.json
	@echo "--- a scenario file: 20 machines classify radiator faults from 9 sensor readings (UCI Shuttle), FedProx"
	@if $(BIN)/fedge sim check scenarios/predictive-maintenance.toml >/dev/null 2>&1; then \
		$(BIN)/fedge sim run scenarios/predictive-maintenance.toml --out runs/demo/maintenance.json; \
	else echo "skipped: UCI Shuttle not found (sudo apt-get install r-cran-mlbench)"; fi
	@echo "--- canary rollouts to 200 simulated devices over MQTT: a good INT8 variant promotes, a badly calibrated one is rolled back at the canary"
	@if (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then \
		$(BIN)/fedge sim rollout --devices 200 --stages 5,25,100 --bake 0.5 \
			--workdir runs/demo/rollout --out runs/demo/rollout.json; \
	else echo "skipped: no MQTT broker on 127.0.0.1:1883 (apt-get install mosquitto)"; fi

## demo-fleet: a real deployment on loopback (runs/demo-fleet): fedge server init/start, three
## devices enrolled with one-time tokens running fedge client start, secure rounds with DP-SGD on
## every device, a revoked device refused, the audit trail verified; every process stopped on exit
demo-fleet: setup
	scripts/demo_fleet.sh

## demo-scenarios: the attack scenarios, each run without and then with its defence: a backdoor
## under SecAgg+ against a device-side norm bound, and sign-flipping against a trimmed mean
demo-scenarios: export FEDGE_HOME := $(CURDIR)/runs/demo-scenarios/home
demo-scenarios: setup
	$(BIN)/fedge sim run scenarios/adversarial.toml
	$(BIN)/fedge sim run scenarios/adversarial-robust.toml

# Two pytest workers (pytest-xdist), each test module on one worker (its module fixtures
# run once): the single-threaded unit tests overlap with the simulations. The deployment
# test (real processes, deadlines, a server crash) then runs on a quiet machine: beside
# the other tests its devices' timings raced its own steps. `PYTEST_WORKERS=0`: in-process.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadscope
DEPLOYMENT_TEST := tests/integration/test_deployment.py

## test: the whole test suite (PostgreSQL tests run when FEDGE_TEST_POSTGRES_URL is set)
test: setup
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) --ignore=$(DEPLOYMENT_TEST)
	$(BIN)/python -m pytest $(DEPLOYMENT_TEST)

## test-fast: the suite without the Flower simulations
test-fast: setup
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not slow"

lint: setup
	$(BIN)/ruff check $(PACKAGES) tests benchmarks examples scripts
	$(BIN)/ruff format --check $(PACKAGES) tests benchmarks examples scripts

format: setup
	$(BIN)/ruff format $(PACKAGES) tests benchmarks examples
	$(BIN)/ruff check --fix $(PACKAGES) tests benchmarks examples

typecheck: setup
	$(BIN)/mypy --strict

check: test lint typecheck

## lock: re-pin constraints.txt from the current environment
lock: setup
	{ echo "# Exact versions for reproducible installs: make setup installs with -c constraints.txt."; \
	  echo "# Regenerate after changing pyproject.toml: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^fedge' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > constraints.txt

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache .pytest_cache
