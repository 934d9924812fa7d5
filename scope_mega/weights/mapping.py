"""HF <-> Megatron weight mapping: one declarative table per architecture family, plus the few tensor
transforms the tables name (QKV fusion, gate/up fusion, vocab padding) and their TP merge.

Import, export and live weight streaming all go through `family_for`, `megatron_layout` (import's
transforms as row placements, which import reads straight into place and `to_megatron` applies to
tensors in memory), `to_hf` and `tp_merge`; there is no second copy of any layout rule. The full
(TP=1) layout `megatron_layout` describes is also the global layout of that tensor in a `torch_dist`
checkpoint, whatever TP saved it.

Megatron names are the *canonical* ones of the sharded checkpoint, which are the Transformer Engine
spellings (the local layer spec maps its norm names onto them when saving): `input_layernorm.weight`
is `self_attention.linear_qkv.layer_norm_weight`, `pre_mlp_layernorm.weight` is
`mlp.linear_fc1.layer_norm_weight`. Rules carry the local spelling too, so live models of either
spec bind to the same rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import transformers

from scope_mega.config import ConfigError
from scope_mega.models import arch

Kind = Literal["copy", "qkv", "gate_up", "vocab"]
LAYER_PREFIX_MEGATRON = "decoder.layers."
LAYER_PREFIX_HF = "model.layers."
PRM_ARCHITECTURE = "Qwen2ForProcessRewardModel"


class ConversionError(ConfigError):
    """A user-facing conversion failure (bad input, incomplete mapping); the message is one line."""


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the HF tensor(s) it is made of.

    Layer rules (in `Family.layer`) name tensors relative to `decoder.layers.{i}.` / `model.layers.{i}.`.
    `when` names a feature of the HF config (see `features`) without which the tensor does not exist.
    `export=False` marks a mirror (the tied output layer, a parameter of the last PP stage): it binds
    that parameter, but is never saved, exported or streamed, since Megatron checkpoints it as the
    embedding and its HF tensor is the embedding's.
    """

    megatron: str
    hf: tuple[str, ...]
    kind: Kind = "copy"
    tp_dim: int | None = None  # dimension split over TP ranks; None: replicated
    local: str | None = None  # local-layer-spec spelling, when it differs from `megatron`
    when: str | None = None
    export: bool = True


def _qkv(part: str, when: str | None = None) -> Rule:
    names = tuple(f"self_attn.{p}_proj.{part}" for p in "qkv")
    return Rule(f"self_attention.linear_qkv.{part}", names, "qkv", 0, when=when)


DECODER_LAYER = (
    Rule(
        "self_attention.linear_qkv.layer_norm_weight",
        ("input_layernorm.weight",),
        local="input_layernorm.weight",
    ),
    _qkv("weight"),
    _qkv("bias", when="qkv_bias"),
    Rule("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), when="qk_norm"),
    Rule("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), when="qk_norm"),
    Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), tp_dim=1),
    Rule(
        "mlp.linear_fc1.layer_norm_weight",
        ("post_attention_layernorm.weight",),
        local="pre_mlp_layernorm.weight",
    ),
    Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up", 0),
    Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), tp_dim=1),
)
EMBEDDING = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0)
FINAL_NORM = Rule("decoder.final_layernorm.weight", ("model.norm.weight",))
LM_HEAD = (
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", 0, when="untied"),
    Rule("output_layer.weight", ("model.embed_tokens.weight",), "vocab", 0, when="tied", export=False),
)
# Qwen2.5-Math-PRM-7B: no lm_head; score = Linear(h, h) -> ReLU -> Linear(h, 2), replicated over TP.
PRM_HEAD = tuple(Rule(f"score.{i}.{p}", (f"score.{i}.{p}",)) for i in (0, 2) for p in ("weight", "bias"))


@dataclass(frozen=True)
class Family:
    """The mapping of one architecture family: per-layer rules and the rules outside the layers."""

    name: str
    layer: tuple[Rule, ...]
    top: tuple[Rule, ...]


FAMILIES = {
    "llama": Family("llama", DECODER_LAYER, (EMBEDDING, FINAL_NORM, *LM_HEAD)),
    "mistral": Family("mistral", DECODER_LAYER, (EMBEDDING, FINAL_NORM, *LM_HEAD)),
    "qwen2": Family("qwen2", DECODER_LAYER, (EMBEDDING, FINAL_NORM, *LM_HEAD)),
    "qwen3": Family("qwen3", DECODER_LAYER, (EMBEDDING, FINAL_NORM, *LM_HEAD)),
    "qwen2_prm": Family("qwen2_prm", DECODER_LAYER, (EMBEDDING, FINAL_NORM, *PRM_HEAD)),
}


def is_prm(hf: transformers.PretrainedConfig) -> bool:
    return PRM_ARCHITECTURE in (getattr(hf, "architectures", None) or ())


def family_for(hf: transformers.PretrainedConfig) -> Family:
    """The mapping for an HF config; unsupported architectures fail with the supported list."""
    name = "qwen2_prm" if is_prm(hf) else hf.model_type
    if name == "qwen2_prm" and hf.model_type != "qwen2":
        raise ConversionError(f"{PRM_ARCHITECTURE} needs model_type qwen2, got '{hf.model_type}'")
    if name not in FAMILIES:
        raise ConversionError(
            f"unsupported architecture '{hf.model_type}'; supported: {', '.join(arch.SUPPORTED_FAMILIES)} "
            f"and {PRM_ARCHITECTURE} (qwen2)"
        )
    return FAMILIES[name]


def features(hf: transformers.PretrainedConfig) -> frozenset[str]:
    """Config features that switch optional rules on (`Rule.when`)."""
    tied = bool(getattr(hf, "tie_word_embeddings", False))
    flags = {"tied" if tied else "untied"}
    if arch.has_qkv_bias(hf):
        flags.add("qkv_bias")
    if arch.has_qk_norm(hf):
        flags.add("qk_norm")
    return frozenset(flags)


@dataclass(frozen=True)
class Dims:
    """Sizes the transforms need."""

    heads: int
    groups: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, hf: transformers.PretrainedConfig) -> Dims:
        return cls(hf.num_attention_heads, arch.num_kv_heads(hf), arch.head_dim(hf), hf.vocab_size)


@dataclass(frozen=True)
class Binding:
    """A rule applied to one tensor: full Megatron and HF names, and its layer (None: not in a layer)."""

    rule: Rule
    megatron: str
    hf: tuple[str, ...]
    layer: int | None


def bindings(hf: transformers.PretrainedConfig) -> list[Binding]:
    """Every tensor of the model in HF order (embedding, layers 0..L-1, final norm, head)."""
    family, on = family_for(hf), features(hf)
    active = lambda rules: [r for r in rules if r.when is None or r.when in on]
    top = active(family.top)
    out = [Binding(r, r.megatron, r.hf, None) for r in top if r.megatron.startswith("embedding.")]
    for i in range(hf.num_hidden_layers):
        out += [
            Binding(
                r,
                f"{LAYER_PREFIX_MEGATRON}{i}.{r.megatron}",
                tuple(f"{LAYER_PREFIX_HF}{i}.{n}" for n in r.hf),
                i,
            )
            for r in active(family.layer)
        ]
    out += [Binding(r, r.megatron, r.hf, None) for r in top if not r.megatron.startswith("embedding.")]
    return out


def hf_names(hf: transformers.PretrainedConfig) -> list[str]:
    """The HF tensors a checkpoint of this config holds (each once)."""
    return list(dict.fromkeys(n for b in bindings(hf) if b.rule.export for n in b.hf))


def canonical_name(name: str, layer_numbers: dict[int, int]) -> str:
    """A live parameter name -> the canonical Megatron name with the *global* layer index.

    `layer_numbers` maps this stage's local layer index to its global index; local-spec norm names
    become their checkpoint (TE) spelling.
    """
    if not name.startswith(LAYER_PREFIX_MEGATRON):
        return name
    local, suffix = name[len(LAYER_PREFIX_MEGATRON) :].split(".", 1)
    suffix = _LOCAL_TO_CANONICAL.get(suffix, suffix)
    return f"{LAYER_PREFIX_MEGATRON}{layer_numbers[int(local)]}.{suffix}"


_LOCAL_TO_CANONICAL = {r.local: r.megatron for r in DECODER_LAYER if r.local}


# ----------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class Block:
    """Rows `[src, src + rows)` of HF tensor number `part` are rows `[dst, dst + rows)` of the Megatron
    tensor (rows: the first dimension; the elements of a 1-D tensor)."""

    part: int
    src: int
    dst: int
    rows: int


@dataclass(frozen=True)
class Layout:
    """The full (TP=1) Megatron tensor as row blocks of its HF tensors, in Megatron row order. Every
    import transform is such a row placement, so import can read each block straight into its place;
    rows no block covers are zero (vocab padding)."""

    rows: int
    blocks: tuple[Block, ...]

    def gaps(self) -> list[tuple[int, int]]:
        """The `[start, stop)` row ranges no block covers."""
        out, at = [], 0
        for b in (*self.blocks, Block(0, 0, self.rows, 0)):
            if b.dst > at:
                out.append((at, b.dst))
            at = b.dst + b.rows
        return out


def megatron_layout(rule: Rule, hf_rows: list[int], dims: Dims, padded_vocab: int) -> Layout:
    """Where the rows of the HF tensors (`hf_rows[i]` rows each, in `rule.hf` order) go in the full
    Megatron tensor; row counts that do not fit the config fail here."""
    if rule.kind == "copy":
        return Layout(hf_rows[0], (Block(0, 0, 0, hf_rows[0]),))
    if rule.kind == "vocab":
        if hf_rows[0] != dims.vocab_size:
            raise ConversionError(f"{rule.hf[0]} has {hf_rows[0]} rows, config vocab_size={dims.vocab_size}")
        if padded_vocab < dims.vocab_size:
            raise ConversionError(f"{rule.megatron} has {padded_vocab} rows, fewer than vocab_size")
        return Layout(padded_vocab, (Block(0, 0, 0, dims.vocab_size),))
    if rule.kind == "gate_up":
        gate, up = hf_rows
        return Layout(gate + up, (Block(0, 0, 0, gate), Block(1, 0, gate, up)))
    # qkv: per KV group, its heads/groups query heads, then its K head, then its V head
    g, d = dims.groups, dims.head_dim
    per = dims.heads // g
    expected = (dims.heads * d, g * d, g * d)
    for part, rows, want in zip("qkv", hf_rows, expected):
        if rows != want:
            raise ConversionError(f"{part}_proj has {rows} rows, expected {want} from config")
    group = (per + 2) * d
    blocks = []
    for j in range(g):
        blocks += [Block(0, j * per * d, j * group, per * d), Block(1, j * d, j * group + per * d, d)]
        blocks.append(Block(2, j * d, j * group + (per + 1) * d, d))
    return Layout(g * group, tuple(blocks))


def to_megatron(rule: Rule, tensors: list[torch.Tensor], dims: Dims, padded_vocab: int) -> torch.Tensor:
    """HF tensor(s) -> the full (TP=1) Megatron tensor, placed as `megatron_layout` says (a rule that
    only copies returns the HF tensor itself)."""
    layout = megatron_layout(rule, [t.shape[0] for t in tensors], dims, padded_vocab)
    first = tensors[0]
    if layout.rows == first.shape[0] and len(layout.blocks) == 1:
        return first
    for name, t in zip(rule.hf, tensors):
        if t.shape[1:] != first.shape[1:]:
            raise ConversionError(f"{name} has shape {tuple(t.shape)}, {rule.hf[0]} {tuple(first.shape)}")
    out = first.new_empty((layout.rows, *first.shape[1:]))
    for b in layout.blocks:
        out[b.dst : b.dst + b.rows] = tensors[b.part][b.src : b.src + b.rows]
    for start, stop in layout.gaps():
        out[start:stop] = 0
    return out


def to_hf(rule: Rule, tensor: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
    """The full (TP=1) Megatron tensor -> its HF tensor(s), in `rule.hf` order (inverse of `to_megatron`)."""
    if rule.kind == "copy":
        return [tensor]
    if rule.kind == "vocab":
        return [tensor[: dims.vocab_size]]
    if rule.kind == "gate_up":
        return list(tensor.chunk(2))
    g, d, rest = dims.groups, dims.head_dim, tensor.shape[1:]
    per = dims.heads // g
    q, k, v = tensor.reshape(g, (per + 2) * d, *rest).split([per * d, d, d], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def tp_merge(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full Megatron tensor from all TP ranks' slices. Megatron splits along `tp_dim` in equal
    contiguous parts (for QKV: whole KV groups, since its rows are grouped), except gate/up, where TP
    rank i holds `[gate_i; up_i]`."""
    if rule.tp_dim is None or len(shards) == 1:
        return shards[0]
    if rule.kind == "gate_up":
        halves = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards, dim=rule.tp_dim)


def iter_layers(items: list[Binding]) -> Iterator[list[Binding]]:
    """Bindings grouped by layer (top-level tensors each on their own), in order."""
    group: list[Binding] = []
    for b in items:
        if group and (b.layer is None or b.layer != group[-1].layer):
            yield group
            group = []
        group.append(b)
    if group:
        yield group


# ----------------------------------------------------------------------------- live models


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under Megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def bind_parameters(
    model: torch.nn.Module, hf: transformers.PretrainedConfig
) -> list[tuple[Binding, str, torch.nn.Parameter]]:
    """This pipeline stage's parameters, each with the binding that maps it; a parameter no rule
    covers is an error (nothing is ever left silently at its random initialisation)."""
    model = unwrap(model)
    layers = getattr(getattr(model, "decoder", None), "layers", ())
    layer_numbers = {i: layer.layer_number - 1 for i, layer in enumerate(layers)}
    by_name = {b.megatron: b for b in bindings(hf)}
    bound, unmapped = [], []
    for name, param in model.named_parameters():
        binding = by_name.get(canonical_name(name, layer_numbers))
        if binding is None:
            unmapped.append(name)
        else:
            bound.append((binding, name, param))
    if unmapped:
        raise ConversionError(
            f"Megatron parameters with no {family_for(hf).name} mapping: {some_names(unmapped)}"
        )
    return bound


def some_names(names: list[str], limit: int = 6) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
