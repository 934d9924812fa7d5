# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch that these machines provide locally (no GBs of CUDA wheels).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# The tiny CPU demo: SFT warm-start, then GRPO + SCOPE RL, then curves and a markdown report.
DEMO_DIR ?= runs/demo
demo: venv
	$(PY) -m scope_mega.cli sft examples/tiny_cpu.yaml run_dir=$(DEMO_DIR)
	$(PY) -m scope_mega.cli train examples/tiny_cpu.yaml run_dir=$(DEMO_DIR)
	$(PY) tools/plot_metrics.py $(DEMO_DIR) --report

lint: venv
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache .ruff_cache
