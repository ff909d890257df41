# powerq — the two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test chaos demo demo-stop bench lint clean

$(STAMP): pyproject.toml deploy/bootstrap.sh
	bash deploy/bootstrap.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[worker,flower,api,test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	bash deploy/bootstrap.sh   # quick when all is installed: starts RabbitMQ if it is down
	$(VENV)/bin/ruff check drivers workers scheduler tests
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -p no:cacheprovider

# The chaos scenarios at full size (4,000 node cycles under repeated worker kills, a Redis
# restart mid-batch, a degraded fleet), the secret scans, and the bad-input property tests at
# >= 10,000 examples each (pyghmi's IPMI fuzzers fewer: its login retries take seconds each).
chaos: $(STAMP)
	POWERQ_CHAOS_SCALE=large $(VENV)/bin/pytest -q -p no:cacheprovider -m chaos --timeout 1800 tests/chaos
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/test_e2e.py::test_no_secret_anywhere tests/test_redis_tls.py
	POWERQ_HYPOTHESIS_PROFILE=chaos $(VENV)/bin/pytest -q -p no:cacheprovider -o timeout=0 tests/property

# powerq against ipmipower, pyghmi and ipmitool on 1,000 and 5,000 simulated BMCs, three
# repetitions: prints the tables, rewrites docs/benchmarks.md and docs/benchmarks.png.
# A smoke run: $(PY) -m tests.bench.run --sizes 200 --reps 1 --out /tmp/bench
bench: $(STAMP)
	$(PY) -m tests.bench.run --sizes 1000,5000 --reps 3 --out docs --json docs/benchmarks.json

demo: $(STAMP)
	bash deploy/demo.sh

demo-stop:
	bash deploy/demo.sh stop

lint: $(STAMP)
	$(VENV)/bin/ruff check drivers workers scheduler tests
	$(VENV)/bin/mypy

clean: demo-stop
	rm -rf $(VENV) .demo
