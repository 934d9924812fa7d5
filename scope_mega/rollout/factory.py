"""`make_engine`: a rollout engine of either kind, for the trainer, SCOPE's guide and evaluation.

It sits above the protocol (`engine`) and both implementations (`hf_engine`, `vllm_engine`), which
never import it; each implementation is imported only when asked for (vLLM takes seconds to import).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from scope_mega.rollout.engine import Decode, RolloutEngine


def load_decoder(model_dir: str | os.PathLike) -> Decode:
    """`decode(ids)` for the tokenizer stored with a model: the project's sentencepiece
    `tokenizer.model`, else a transformers tokenizer (special tokens skipped)."""
    from scope_mega.data.hf_tokenizer import load_model_tokenizer

    return load_model_tokenizer(model_dir).decode


def make_engine(
    kind: Literal["hf", "vllm"],
    model: str | os.PathLike | dict[str, Any] | Any,
    decode: Decode | None = None,
    **kwargs: Any,
) -> RolloutEngine:
    """A rollout engine of `kind` for `model`: the policy, a teacher, or a guide -- any number of them
    side by side. `model` is a model directory, or (hf only) an HF config / config dict; without stored
    weights the engine starts from random ones, to be replaced through `update_weights` before use.
    `decode` defaults to the tokenizer stored with the model. Other keyword arguments go to the engine."""
    is_dir = isinstance(model, (str, os.PathLike))
    if kind not in ("hf", "vllm"):
        raise ValueError(f"make_engine: unknown engine kind {kind!r}; choose 'hf' or 'vllm'")
    if decode is None:
        if not is_dir:
            raise ValueError("make_engine: pass decode=... when the model is given as a config")
        decode = load_decoder(model)
    if kind == "vllm":
        if not is_dir:
            raise ValueError("make_engine: the vllm engine needs a model directory (with config.json)")
        from scope_mega.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(str(model), decode, **kwargs)
    from scope_mega.rollout.hf_engine import HFEngine

    if is_dir and any(p.suffix in (".safetensors", ".bin") for p in Path(model).iterdir()):
        return HFEngine.from_pretrained(model, decode, **kwargs)
    return HFEngine.from_config(model, decode, **kwargs)
