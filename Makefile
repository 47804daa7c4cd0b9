# The two commands of the README. Both create .venv when it is missing, install the project into it when
# pyproject.toml changed since the last install, and say what they do.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROFILE ?= quick
# Notebooks at once (each its own process, after the notebooks it reads from): two cores run the quick profile's
# lanes side by side; the small profile's notebook 09 already keeps both cores busy with its own runs.
JOBS ?= $(if $(filter quick smoke,$(PROFILE)),2,1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning costs up to 10x.
export OMP_WAIT_POLICY := passive

.PHONY: reproduce test lint install clean-runs browser-check

$(PY):
	@echo "==> creating $(VENV) with $$($(PYTHON) --version)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@echo "==> installing uniperceiver-v2 and its dependencies into $(VENV) (first time: a few minutes)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

reproduce: $(STAMP)
	@echo "==> reproduction, profile '$(PROFILE)' (data, notebooks and tables under runs/$(PROFILE))"
	$(PY) -m uniperceiver_v2.reproduce --profile $(PROFILE) --jobs $(JOBS)

test: $(STAMP)
	@echo "==> running the test suite"
	$(PY) -m pytest -q

lint: $(STAMP)
	@echo "==> ruff (rules in pyproject.toml)"
	$(VENV)/bin/ruff check uniperceiver_v2 tests

clean-runs:
	rm -rf runs/

# Opt-in, outside CI: an explorer (ipywidgets) in JupyterLab, driven in headless Chromium; writes the screenshot
# docs/img/explorer_browser_check.png. Needs `apt-get install chromium chromium-driver`.
browser-check: $(STAMP)
	@echo "==> JupyterLab + headless Chromium: an explorer opened, run, a control changed (tests/browser_check.py)"
	@$(PY) -c "import selenium" 2>/dev/null || $(PY) -m pip install -q -e ".[browser]"
	$(PY) tests/browser_check.py
