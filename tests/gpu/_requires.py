"""Skip marks the GPU tests share, one per package that some of them need beyond CUDA and that a
machine may lack (the bare GPU image of docs/gpu/README.md lacks both: their CUDA wheels are too large
to carry there). Each names the package, so that a skip says what is missing."""

import importlib.util

import pytest

NEEDS_VLLM = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="needs vLLM, not installed here (pip install -e '.[gpu]')",
)
NEEDS_TE = pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None,
    reason="needs Transformer Engine, not installed here (pip install -e '.[gpu]')",
)
