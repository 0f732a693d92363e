# Two commands: `make run` serves the service, `make test` runs the whole suite.
# Both create the virtual environment and install the project on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	mkdir -p var
	CDS_ENV=development $(BIN)/cds-service serve --host 127.0.0.1 --port 8080

test: $(STAMP)
	$(BIN)/ruff check cds_service tests fixtures bench docs
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pytest bench/test_engine_bench.py -q --benchmark-columns=min,median,mean,max,rounds
	$(BIN)/python bench/run.py --duration $${BENCH_SECONDS:-10}
	$(BIN)/python bench/soak.py --duration $${SOAK_SECONDS:-60} --json bench/soak.json

lint: $(STAMP)
	$(BIN)/ruff check cds_service tests fixtures bench docs

clean:
	rm -rf $(VENV) var .pytest_cache
