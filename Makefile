# fewstep: `make quickstart` (set up + run the main job on the embedded default), `make test`.
# Both create .venv on first use; nothing is downloaded at run time, only packages at set-up.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a fresh machine torch comes first, so the project's unpinned `torch>=2.3` is already met. Override
# TORCH (e.g. TORCH="torch --index-url <your CUDA index>") to choose a build; an existing torch is kept.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.fewstep-installed

.PHONY: setup quickstart test lint clean chromium

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py runtime/_native.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m distill.run --out runs/quickstart
	@echo
	@echo "Outputs: runs/quickstart/student (the 1-step student bundle), samples.png (student beside teacher),"
	@echo "         metrics.json (FD, class accuracy vs the teacher), losses.png, metrics.jsonl, config.json."
	@echo "Next:    $(PY) -m distill.run --preset digits-4step --out runs/digits-4step   # a 4-step student"
	@echo "         $(PY) -m distill.sample --model runs/quickstart/student --n 100 --out runs/student.npz"
	@echo "         $(PY) -m distill.run --help   # presets, including SD 1.5 / SDXL on your own teacher"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The demo's browser test drives Debian's Chromium through Playwright (never Playwright's own browser download);
# where apt-get cannot install it, that one test is skipped.
chromium:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
		echo "note: Chromium is not installed and apt-get could not install it: the demo's browser test will be skipped"

test: lint chromium
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
