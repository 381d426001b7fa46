# The README's two commands. Both create the virtual environment on first use and
# install nadray with every dependency pinned by requirements.lock.
# Python 3.11: python3.11 when it is on PATH, else python3 (pyproject refuses other versions).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo-output

.PHONY: demo test install clean lint

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -n "$(PYTHON)" || { echo "need Python 3.11 on PATH (python3.11 or python3), or run: make PYTHON=/path/to/python3.11"; exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "$(PYTHON) is not Python 3.11; run: make PYTHON=/path/to/python3.11"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==24.3.1
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

# The nightly pipeline, end to end, on the real data bundled in nadray/datasets,
# with an embedded Ray and local folders under $(DEMO_DIR)/.
demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) jobs/nightly_retrain.py --demo --workdir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(DEMO_DIR)
