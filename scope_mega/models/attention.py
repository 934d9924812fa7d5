"""Core attention for the local (non-Transformer Engine) layers, packed (THD) input included.

Megatron's local `DotProductAttention` refuses packed input; Transformer Engine's attention takes the
THD layout (one row of sequences end to end, `cu_seqlens` their boundaries) in one variable-length
kernel. `PackedDotProductAttention` runs each `cu_seqlens` segment through the local attention as a
one-row batch, causal within itself, so packed micro-batches mean the same thing on every backend
and the CPU runs the trainer's THD path for real.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention


class PackedDotProductAttention(DotProductAttention):
    """Megatron's local core attention, and THD input one `cu_seqlens` segment at a time."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """Padded input ([s, b, heads, dim]) as Megatron's; THD input ([t, heads, dim]) one segment at
        a time, each -> [s, 1, hidden], concatenated to [t, 1, hidden]."""
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed input must be THD, got qkv_format={packed_seq_params.qkv_format!r}")
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        attend = super().forward  # (zero-argument super() does not reach into a comprehension)
        parts = [
            attend(query[a:b, None], key[a:b, None], value[a:b, None], None, attn_mask_type, attention_bias)
            for a, b in zip(bounds, bounds[1:])
        ]
        return torch.cat(parts)
