# fewstep: `make quickstart` (set up + run the main job on the embedded default), `make test`.
# Both create .venv on first use; nothing is downloaded at run time, only packages at set-up.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a fresh machine torch comes first, so the project's unpinned `torch>=2.3` is already met. Override
# TORCH (e.g. TORCH="torch --index-url <your CUDA index>") to choose a build; an existing torch is kept.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.fewstep-installed

.PHONY: setup quickstart test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m distill.eval --model distill/assets/digits_teacher --sampler dpmpp-2m --nfe 8 --n 500 --out runs/quickstart
	@echo
	@echo "Outputs: runs/quickstart/metrics.json (FD, class accuracy) and runs/quickstart/grid_*.png (samples)."
	@echo "Next:    $(PY) -m distill.sample --model distill/assets/digits_teacher --sampler ddim --nfe 4 --out runs/samples.npz"
	@echo "         $(PY) -m distill.baselines   # the teacher's NFE table every student is compared with"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
