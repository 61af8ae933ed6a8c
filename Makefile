# Two commands on a fresh machine:
#   make demo   install moeplace and solve + evaluate the bundled real trace
#   make test   run the test suite (what CI runs: .ci/run)
PY ?= python3
# Installed only when no torch is present: a GPU box keeps the CUDA build its user chose.
TORCH_SPEC ?= torch==2.13.0
TRACE ?= traces/flame-moe-290m-decoder.npz
OUT ?= out

.PHONY: install demo test lint bench clean

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	@$(PY) -m pip install -q -e ".[dev]"

demo: install
	$(PY) -m moeplace solve $(TRACE) --gpus 8 --gpus-per-node 4 --train-fraction 0.5 --seed 0 -o $(OUT)/placement.json
	$(PY) -m moeplace eval $(OUT)/placement.json $(TRACE)

test: install
	$(PY) -m pytest

lint:  # pyflakes-level errors and the type hints (mypy settings in pyproject.toml)
	@$(PY) -m pip install -q -e ".[lint]"
	$(PY) -m ruff check --select F,E9 src tests scripts
	$(PY) -m mypy

bench: install
	$(PY) scripts/bench_solve.py

clean:
	rm -rf $(OUT) .pytest_cache build dist src/*.egg-info
