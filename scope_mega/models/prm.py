"""The process reward model in the Qwen2.5-Math-PRM layout, on Megatron-Core, and `MegatronPRM`, the
`scope.prm.PRM` that scores steps with it.

Layout (docs/design.md section 6): a Qwen2 backbone without `lm_head` (the GPTModel decoder, final norm on
the last stage, no `output_layer`) and, on the last pipeline stage, a two-class head
`score` = Linear(h, h) -> ReLU -> Linear(h, 2), replicated over TP (`score.0.*`, `score.2.*`, the HF
names too). Each step ends with the separator token `<extra_0>`; a step's score is softmax(logits)[1]
at its separator position.

Weights only ever come from a checkpoint converted by `scope_mega.weights` (`load_prm_weights`): every
parameter must be bound by the `qwen2_prm` mapping and written by the load, otherwise it fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from scope_mega.config import ModelConfig, ParallelConfig
from scope_mega.models import arch
from scope_mega.models.context_parallel import gather_positions, split_batch
from scope_mega.models.gpt import ModelSpec, layer_spec
from scope_mega.models.pipeline import pipeline_forward
from scope_mega.runtime.served import Served
from scope_mega.scope.prm import PRM

STEP_SEPARATOR = "<extra_0>"
DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def _prm_class():
    """`PRMModel`, a GPTModel subclass (defined lazily: Megatron is imported only when a model is built)."""
    global _PRM_CLASS
    if _PRM_CLASS is not None:
        return _PRM_CLASS
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    class PRMModel(GPTModel):
        """GPTModel stage whose last stage ends in the `score` head instead of the LM output layer.

        `forward(input_ids, position_ids, attention_mask)` is GPTModel's: on the last stage it returns
        the per-position class logits [batch, seq, 2], full (not vocab- or TP-parallel) and identical on
        every TP rank; on other stages the hidden states [seq, batch, hidden] for the next stage.
        """

        def _postprocess(self, hidden_states, *args, **kwargs):
            if not self.post_process:
                return hidden_states
            if self.config.sequence_parallel:  # the head is replicated: it needs the whole sequence
                hidden_states = gather_from_sequence_parallel_region(
                    hidden_states, tensor_parallel_output_grad=False
                )
            return self.score(hidden_states).transpose(0, 1).contiguous()

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            # MegatronModule's: LanguageModule's version expects an output layer to tie or pad.
            metadata = ensure_metadata_has_dp_cp_group(metadata)
            return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets, metadata)

    _PRM_CLASS = PRMModel
    return PRMModel


_PRM_CLASS = None


def prm_architecture_problem(hf: Any) -> str | None:
    """Why a PRM of HF config `hf` is not the Qwen2.5-Math-PRM layout this module builds (None: it is).
    `validation` refuses a configured PRM for it; the importer's build refuses it too."""
    if hf.model_type != "qwen2":
        return f"the Qwen2.5-Math-PRM layout needs model_type qwen2, got '{hf.model_type}'"
    if arch.rope_scaling(hf) is not None:
        return "the PRM supports plain RoPE only (Qwen2 has no rope scaling)"
    return None


def build_prm_model(
    model_cfg: ModelConfig, parallel: ParallelConfig, device: torch.device
) -> tuple[torch.nn.Module, ModelSpec]:
    """Build this rank's pipeline stage of the PRM (weights NOT set: load them with `load_prm_weights`).

    Must run after `runtime.init_distributed`; works under `torch.device("meta")` (the importer's
    shape-only build). `model_cfg.hf_config` is the HF config of a `Qwen2ForProcessRewardModel`
    checkpoint (model_type qwen2); the LM's `tie_word_embeddings` is ignored, a PRM has no LM head.
    """
    from megatron.core import parallel_state

    hf = arch.load_hf_config(model_cfg.hf_config)
    if problem := prm_architecture_problem(hf):
        raise arch.ArchError(problem)
    impl = arch.check_transformer_impl(model_cfg, device)
    config = arch.transformer_config(hf, model_cfg, parallel, device)
    padded = arch.padded_vocab_size(hf.vocab_size, model_cfg.make_vocab_size_divisible_by, parallel.tp)
    last = parallel_state.is_pipeline_last_stage()
    model = _prm_class()(
        config=config,
        transformer_layer_spec=layer_spec(impl, arch.has_qk_norm(hf)),
        vocab_size=padded,
        max_sequence_length=hf.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=last,  # the decoder's final norm lives on the last stage
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta(hf),
    )
    if last:
        del model.output_layer  # GPTModel always builds one on the last stage; the PRM has none
        h, dtype = hf.hidden_size, config.params_dtype
        model.score = torch.nn.Sequential(
            torch.nn.Linear(h, h, dtype=dtype), torch.nn.ReLU(), torch.nn.Linear(h, 2, dtype=dtype)
        )
    if device.type == "cuda":
        model.cuda(torch.cuda.current_device())
    return model, ModelSpec(hf, hf.vocab_size, padded, impl, config.params_dtype)


def load_prm_weights(
    path: str | Path,
    model: torch.nn.Module,
    spec: ModelSpec,
    load: Callable[[str | Path, torch.nn.Module], None] | None = None,
) -> None:
    """Load a converted checkpoint `<path>/model` (any TP/PP) into this stage with `load` (default:
    `weights.megatron_ckpt.load_model_weights`), and fail unless every parameter was both mapped
    (`qwen2_prm` rules) and written by the load.

    Parameters are poisoned with NaN first, so one the load did not write is caught whatever the
    loader's own strictness; a checkpoint holding NaN fails too, which is what we want.
    """
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from scope_mega.weights.mapping import ConversionError, bind_parameters, some_names, unwrap
    from scope_mega.weights.megatron_ckpt import load_model_weights

    load = load or load_model_weights

    bind_parameters(model, spec.hf_config)  # raises on a parameter no rule maps
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.fill_(float("nan"))
    try:
        load(path, model)
    except (Exception, CheckpointException) as err:
        first = str(err).strip().splitlines()
        raise ConversionError(f"loading the PRM from {path} failed: {first[-1] if first else err!r}") from err
    with torch.no_grad():
        unset = [n for n, p in params.items() if not torch.isfinite(p).all()]
    if unset:
        raise ConversionError(f"PRM parameters not set by the checkpoint {path}: {some_names(unset)}")


# ----------------------------------------------------------------------------- formatting


def prm_conversation(
    tokenizer: Any, question: str, steps: Sequence[str], system: str = DEFAULT_SYSTEM_PROMPT
) -> str:
    """The text Qwen2.5-Math-PRM scores: system / user (question) / assistant (the steps, each followed
    by `<extra_0>`), rendered with the tokenizer's chat template (`apply_chat_template`, as the model
    card does). A tokenizer without a chat template gets Qwen's ChatML rendering of the same messages.
    """
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": question},
        {"role": "assistant", "content": "".join(f"{s}{STEP_SEPARATOR}" for s in steps)},
    ]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def separator_id(tokenizer: Any) -> int:
    """The id of `<extra_0>`; it must be a single token."""
    ids = tokenizer.encode(STEP_SEPARATOR, add_special_tokens=False) if _is_hf(tokenizer) else None
    if ids is None:
        ids = tokenizer.encode(STEP_SEPARATOR)
    if len(ids) != 1:
        raise ValueError(f"the PRM tokenizer must encode {STEP_SEPARATOR} as one token, got {ids}")
    return int(ids[0])


def _is_hf(tokenizer: Any) -> bool:
    return hasattr(tokenizer, "apply_chat_template") and hasattr(tokenizer, "convert_tokens_to_ids")


def step_scores(logits: torch.Tensor) -> torch.Tensor:
    """softmax(logits)[..., 1]: the probability that the step ending at each position is correct."""
    return logits.float().softmax(-1)[..., 1]


def step_probabilities(logits: torch.Tensor, token_mask: torch.Tensor) -> list[list[float]]:
    """Per-row `step_scores` at the positions `token_mask` marks, in order.

    logits [batch, seq, 2], token_mask [batch, seq] bool."""
    return _at(step_scores(logits), token_mask)


def _at(scores: torch.Tensor, token_mask: torch.Tensor) -> list[list[float]]:
    return [scores[i][token_mask[i]].tolist() for i in range(scores.shape[0])]


class MegatronPRM(PRM):
    """`PRM` backed by a loaded `build_prm_model` stage (any TP, CP and PP).

    `score_batch` is collective over the replica (TP x CP x PP): every rank of it must call it with the
    same inputs (`ServedPRM` arranges that). Sequences are right-padded to one width and go through the
    pipeline schedule in micro-batches of `max_batch_size`; with causal attention the padding never
    reaches a real position, so no padding mask is needed. Under CP each rank runs its part of every
    row (`models.context_parallel`) and the per-position scores, not the logits, are gathered. The
    last stage computes the scores and sends them to the rest of its pipeline.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_batch_size: int = 8,
        max_length: int | None = None,
    ) -> None:
        from megatron.core import parallel_state

        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_batch_size = max_batch_size
        self.sep_id = separator_id(tokenizer)
        inner = model
        while hasattr(inner, "module"):
            inner = inner.module
        self.config = inner.config
        self.max_length = max_length or inner.max_sequence_length
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.cp = parallel_state.get_context_parallel_world_size()

    def encode(self, question: str, steps: Sequence[str]) -> list[int]:
        """Token ids of one response; exactly one separator per step, or a ValueError."""
        text = prm_conversation(self.tokenizer, question, steps, self.system_prompt)
        ids = list(self.tokenizer.encode(text))
        found = sum(1 for t in ids if t == self.sep_id)
        if found != len(steps):
            raise ValueError(
                f"{found} {STEP_SEPARATOR} tokens for {len(steps)} steps (a step contains the separator?)"
            )
        if len(ids) > self.max_length:
            raise ValueError(f"PRM input of {len(ids)} tokens is longer than max_length={self.max_length}")
        return ids

    def _micro_batches(self, encoded: list[list[int]]) -> list[dict[str, torch.Tensor]]:
        """Right-padded [b, width] micro-batches of `max_batch_size` rows (the last filled with empty
        rows): the pipeline schedule needs one shape for all of them."""
        device = next(self.model.parameters()).device
        width = max(len(ids) for ids in encoded)
        sp = self.tp if self.config.sequence_parallel else 1
        multiple = math.lcm(sp, 2 * self.cp if self.cp > 1 else 1)  # SP splits rows over TP, CP in 2cp chunks
        width = -(-width // multiple) * multiple
        rows = min(self.max_batch_size, len(encoded))
        batches = []
        for start in range(0, len(encoded), rows):
            chunk = encoded[start : start + rows]
            tokens = torch.zeros(rows, width, dtype=torch.long, device=device)
            for i, ids in enumerate(chunk):
                tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask = tokens == self.sep_id
            mask[len(chunk) :] = False
            positions = torch.arange(width, device=device).expand(rows, width)
            batches.append(dict(input_ids=tokens, position_ids=positions, separators=mask, rows=len(chunk)))
        return batches

    def score_batch(self, questions: Sequence[str], steps: Sequence[Sequence[str]]) -> list[list[float]]:
        import torch.distributed as dist
        from megatron.core import parallel_state

        encoded = [self.encode(q, s) for q, s in zip(questions, steps, strict=True)]
        if not encoded:
            return []
        out: list[list[float]] = []
        whole = self._micro_batches(encoded)
        rank = parallel_state.get_context_parallel_rank()
        batches = iter(whole)

        def collect(logits: torch.Tensor, batch: dict) -> None:
            unsplit = next(batches)  # under CP, the scores of every rank's positions
            scores = gather_positions(step_scores(logits), self.cp, rank)
            out.extend(_at(scores, unsplit["separators"])[: unsplit["rows"]])

        was_training = self.model.training
        self.model.eval()
        try:
            pipeline_forward([self.model], [split_batch(b, self.cp, rank) for b in whole], collect)
        finally:
            self.model.train(was_training)
        group = parallel_state.get_pipeline_model_parallel_group()
        if dist.get_world_size(group) > 1:  # the scores live on the last stage
            box = [out]
            dist.broadcast_object_list(
                box, src=dist.get_global_rank(group, dist.get_world_size(group) - 1), group=group
            )
            out = box[0]
        return out


class ServedPRM(PRM):
    """A `MegatronPRM` driven from its model-parallel group's driver: `score_batch` on the driver runs
    the same TP-collective forward on the group's other ranks, which sit in `served.serve()`. So a
    driver-side algorithm (SCOPE's rectification) can use a TP-sharded PRM."""

    def __init__(self, prm: MegatronPRM, served: Served) -> None:
        self.prm = prm
        self.served = served
        served.register("prm", prm.score_batch)

    def score_batch(self, questions: Sequence[str], steps: Sequence[Sequence[str]]) -> list[list[float]]:
        return self.served.call("prm", list(questions), [list(s) for s in steps])
