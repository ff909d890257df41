# powerq — the two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test demo demo-stop bench lint clean

$(STAMP): pyproject.toml deploy/bootstrap.sh
	bash deploy/bootstrap.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[worker,flower,test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check drivers workers scheduler tests
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -p no:cacheprovider

demo: $(STAMP)
	bash deploy/demo.sh

demo-stop:
	bash deploy/demo.sh stop

lint: $(STAMP)
	$(VENV)/bin/ruff check drivers workers scheduler tests
	$(VENV)/bin/mypy

clean: demo-stop
	rm -rf $(VENV) .demo
