# fewstep: `make quickstart` (set up, then distil the embedded digits teacher into a 4-step student), `make test`.
# Both create .venv on first use; nothing is downloaded at run time, only packages at set-up.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a fresh machine torch comes first, so the project's unpinned `torch>=2.3` is already met. Override
# TORCH (e.g. TORCH="torch --index-url <your CUDA index>") to choose a build; an existing torch is kept.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.fewstep-installed

.PHONY: setup quickstart test lint clean chromium native-deps native

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py runtime/_native.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m distill.run --preset digits-4step --out runs/quickstart
	@echo
	@echo "Outputs: runs/quickstart/student (a 4-step student bundle; it also serves 1 step), samples.png (student"
	@echo "         beside teacher), metrics.json (FD, class accuracy vs the teacher), losses.png, config.json."
	@echo "Next:    $(PY) -m export.trt --nfe 4     # ONNX + TensorRT engines of this student (ONNX only without TensorRT)"
	@echo "         $(PY) -m runtime.generate --engine runs/quickstart/engine --n 100 --png runs/quickstart/grid.png"
	@echo "         $(PY) -m demo                    # the web demo on this student"
	@echo "         $(PY) -m distill.run --help     # presets, including SD 1.5 / SDXL / SD3 on your own teacher"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The demo's browser test drives Debian's Chromium through Playwright (never Playwright's own browser download);
# where apt-get cannot install it, that one test is skipped.
chromium:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
		echo "note: Chromium is not installed and apt-get could not install it: the demo's browser test will be skipped"

# The native runtime's tests (tests/test_capi.py) build runtime/capi with CMake against OpenVINO's wheel and
# nlohmann_json (a Debian package); where apt-get cannot install it, those tests are skipped.
native-deps:
	@test -f /usr/include/nlohmann/json.hpp || { command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -qq nlohmann-json3-dev || (apt-get update -qq && \
		 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nlohmann-json3-dev)) >/dev/null 2>&1; } || \
		echo "note: nlohmann-json3-dev is not installed and apt-get could not install it: the native runtime tests will be skipped"

# libfewstep (the native runtime, runtime/capi) in build/capi, against the OpenVINO of .venv
native: $(STAMP) native-deps
	cmake -S runtime/capi -B build/capi -DCMAKE_BUILD_TYPE=Release \
		-DOpenVINO_DIR=$$($(PY) -c "import openvino, pathlib; print(pathlib.Path(openvino.__file__).parent / 'cmake')")
	cmake --build build/capi -j

test: lint chromium native-deps
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) runs build .pytest_cache .ruff_cache
