# make demo: install, train the three models on the built-in dataset, export them, serve them.
# make test: install, then run the whole test suite (browser and container tests included).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo train export serve test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m training.run
	$(PY) -m export.run
	$(PY) -m serve.app

train: install
	$(PY) -m training.run
export: install
	$(PY) -m export.run
serve: install
	$(PY) -m serve.app

test: install
	scripts/install-test-tools
	$(PY) -m pytest
	$(PY) -m pytest tests/test_engines.py  # OpenVINO in-process: a pytest process of its own (tests/conftest.py)

clean:
	rm -rf runs models data .pytest_cache
