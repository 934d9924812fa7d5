"""A rollout engine on a Hugging Face `transformers` causal LM (CPU and GPU): tests, tiny CPU runs, and
teachers/guides of any architecture transformers knows.

Decoding is our own loop over `model(..., past_key_values=cache, use_cache=True)` rather than
`generate`, because RL needs the exact logprob of every sampled token under the distribution it was
drawn from (see `engine` for the convention) and per-completion stop reasons. Prompts are left-padded
with an attention mask and explicit position ids (as `generate` does); each prompt is prefilled once
and its KV cache repeated for the `n` samples; finished rows leave the batch so long tails do not pay
for short ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import transformers

from scope_mega.rollout.engine import Completion, Decode, SamplingParams, StopChecker, WeightUpdate
from scope_mega.rollout.weight_sync import CheckedStream


def processed_logprobs(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Log-probs [B, V] of the distribution the next token is drawn from: logits / temperature, then
    top-k, then top-p (the smallest set of most likely tokens with mass >= top_p), renormalised.
    Greedy decoding: the untempered model distribution."""
    logits = logits.float()
    if sampling.greedy:
        return torch.log_softmax(logits, dim=-1)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - sampling.top_p
        drop[..., -1] = False  # the most likely token always stays
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def sample_next(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their logprobs [B] from last-position logits [B, V]."""
    logprobs = processed_logprobs(logits, sampling)
    if sampling.greedy:
        tokens = logits.argmax(dim=-1)
    else:
        tokens = torch.multinomial(logprobs.exp(), 1, generator=generator)[:, 0]
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def _eos_ids(model: transformers.PreTrainedModel) -> list[int]:
    """The ids that end a completion: the generation config's EOS, else the model config's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


class HFEngine:
    """`RolloutEngine` over a transformers causal LM living on `model.device`."""

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        decode: Decode,
        eos_token_ids: Iterable[int] | None = None,
        max_batch_rows: int = 256,
    ) -> None:
        self.model = model.eval()
        self.decode = decode
        self.eos_token_ids = list(_eos_ids(model) if eos_token_ids is None else eos_token_ids)
        self.pad_token_id = model.config.pad_token_id or 0
        self.max_batch_rows = max_batch_rows
        self.device = next(model.parameters()).device
        self.asleep = False

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        decode: Decode,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> HFEngine:
        """An engine with the weights stored in `model_dir` (local files only)."""
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, local_files_only=True
        )
        return cls(model.to(device), decode, **kwargs)

    @classmethod
    def from_config(
        cls,
        hf_config: transformers.PretrainedConfig | dict[str, Any] | str | os.PathLike,
        decode: Decode,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> HFEngine:
        """An engine with randomly initialised weights, to be replaced through `update_weights`;
        `hf_config` may also be a config dict or a directory with config.json."""
        if not isinstance(hf_config, transformers.PretrainedConfig):
            from scope_mega.models.arch import load_hf_config

            hf_config = load_hf_config(hf_config)
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        return cls(model.to(device), decode, **kwargs)

    # ----------------------------------------------------------------------------- protocol

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        if self.asleep:
            raise RuntimeError("HFEngine.generate: the engine is asleep; call wake_up() first")
        if any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("HFEngine.generate: every prompt needs at least one token")
        generator = torch.Generator(device=self.device)
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.seed)
        per_chunk = max(1, self.max_batch_rows // sampling.n)
        out: list[list[Completion]] = []
        for start in range(0, len(prompt_token_ids), per_chunk):
            chunk = prompt_token_ids[start : start + per_chunk]
            flat = self._generate_chunk(chunk, sampling, generator)
            out += [flat[i * sampling.n : (i + 1) * sampling.n] for i in range(len(chunk))]
        return out

    def generate_each(
        self, prompt_token_ids: Sequence[Sequence[int]], samplings: Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        """`generate` with its own settings for each prompt. The simpler way than vLLM's per-request
        seeds: requests whose settings differ only by seed are one batch, drawn from one generator
        seeded by the first one's seed (rows of a batch draw differently), in order of first use."""
        batches: dict[SamplingParams, list[int]] = {}
        for i, s in enumerate(samplings):
            batches.setdefault(dataclasses.replace(s, seed=None), []).append(i)
        out: list[list[Completion]] = [[] for _ in samplings]
        for rows in batches.values():
            done = self.generate([list(prompt_token_ids[i]) for i in rows], samplings[rows[0]])
            for i, completions in zip(rows, done):
                out[i] = completions
        return out

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], full: bool = True
    ) -> WeightUpdate:
        params = dict(self.model.named_parameters())
        stream = CheckedStream(named_tensors, {name: p.shape for name, p in params.items()})
        with torch.no_grad():
            for name, tensor in stream:
                if not _is_memory_of(tensor, params[name]):  # else a sync already wrote it in place
                    params[name].copy_(tensor)  # converts dtype/device; works asleep too (weights on CPU)
        return stream.finish(full)

    def writable_weights(self) -> dict[str, torch.Tensor]:
        """The parameters, detached, when the engine runs on CPU, for a weight sync to fill in place and
        then pass to `update_weights` (which checks them and copies nothing): the engine owns this
        memory and does not read it while a sync runs. Empty on a GPU engine (each tensor is copied
        to the device instead). See `stream_shm.Destination`."""
        if self.device.type != "cpu":
            return {}
        return {name: p.detach() for name, p in self.model.named_parameters()}

    def adopt_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Keep the parameters named in `tensors` in those tensors from now on (current values copied
        in), e.g. shared memory that a weight sync's other ranks write into directly. Tied parameters
        are one parameter, so they stay tied."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                tensor.copy_(params[name])
                params[name].data = tensor

    def sleep(self) -> None:
        """On CUDA, move the weights to CPU memory and free the cache; on CPU only the state changes."""
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self.asleep = True

    def wake_up(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)
        self.asleep = False

    # ----------------------------------------------------------------------------- decoding

    @torch.no_grad()
    def _generate_chunk(
        self, prompts: list[list[int]], sampling: SamplingParams, generator: torch.Generator
    ) -> list[Completion]:
        """All `n` completions of `prompts`, flattened prompt-major."""
        dev, n = self.device, sampling.n
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = transformers.DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1]
        cache = out.past_key_values
        next_pos = torch.tensor([len(p) for p in prompts], device=dev)
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits, mask, next_pos = (t.repeat_interleave(n, dim=0) for t in (logits, mask, next_pos))

        rows = list(range(len(prompts) * n))  # the completion each live batch row belongs to
        tokens: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        done: list[Completion | None] = [None for _ in rows]
        stopped = StopChecker(sampling, self.eos_token_ids, self.decode)
        for step in range(sampling.max_new_tokens):
            new, new_lp = sample_next(logits, sampling, generator)
            keep = []
            for b, (r, tok, lp) in enumerate(zip(rows, new.tolist(), new_lp.tolist())):
                tokens[r].append(tok)
                logprobs[r].append(lp)
                reason = stopped(tokens[r])
                if reason is not None:
                    done[r] = Completion(tokens[r], logprobs[r], "stop", reason, self.decode(tokens[r]))
                elif step == sampling.max_new_tokens - 1:
                    done[r] = Completion(tokens[r], logprobs[r], "length", None, self.decode(tokens[r]))
                else:
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=dev)
                cache.batch_select_indices(index)
                new, mask, next_pos = new[index], mask[index], next_pos[index]
                rows = [rows[b] for b in keep]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            out = self.model(
                input_ids=new[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
        return done  # type: ignore[return-value]


def _is_memory_of(tensor: torch.Tensor, param: torch.Tensor) -> bool:
    """`tensor` is exactly `param`'s memory (same device, dtype, start and strides; shape is checked)."""
    return (
        tensor.device == param.device
        and tensor.dtype == param.dtype
        and tensor.data_ptr() == param.data_ptr()
        and tensor.stride() == param.stride()
    )
