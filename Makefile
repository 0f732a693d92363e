# Two commands: `make run` serves the service, `make test` runs the whole suite.
# Both create the virtual environment and install the project on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint install clean bench native

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,native]'
	touch $(STAMP)

# The hot path compiled with mypyc (cds_service/native.py): rebuilt when its sources changed,
# a no-op otherwise; without a C compiler the service runs as pure Python and says so.
native: $(STAMP)
	$(BIN)/cds-service native build

install: native

run: native
	mkdir -p var
	CDS_ENV=development $(BIN)/cds-service serve --host 127.0.0.1 --port 8080

# The suite runs against the compiled modules; the tests that count calls by patching the
# clinical core (which compiled classes do not allow) run again on the sources.
test: native
	$(BIN)/ruff check cds_service tests fixtures bench docs
	$(BIN)/python -m pytest
	CDS_NATIVE=0 $(BIN)/python -m pytest -m sources

bench: native
	$(BIN)/python -m pytest bench/test_engine_bench.py -q --benchmark-columns=min,median,mean,max,rounds
	$(BIN)/python bench/run.py --duration $${BENCH_SECONDS:-10}
	$(BIN)/python bench/soak.py --duration $${SOAK_SECONDS:-60} --json bench/soak.json

lint: $(STAMP)
	$(BIN)/ruff check cds_service tests fixtures bench docs

clean:
	rm -rf $(VENV) var .pytest_cache cds_service/native.json
	find cds_service -name '*.so' -delete
