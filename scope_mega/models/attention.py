"""Core attention for the local (non-Transformer Engine) layers: packed (THD) input and context
parallelism included.

Megatron's local `DotProductAttention` refuses packed input and context parallelism; Transformer
Engine's attention takes both (THD: one row of sequences end to end, `cu_seqlens` their boundaries,
in one variable-length kernel; CP: its ring or all-gather attention). `PackedDotProductAttention`
gives the local spec the same meaning on both, so CPU runs (and CI) run the trainer's THD and CP
paths for real:
- THD: each `cu_seqlens` segment goes through the local attention as a one-row batch, causal within
  itself.
- CP > 1 (`models.context_parallel`): K and V of the CP group are gathered into each sequence's global
  order, and this rank's queries attend to them at their global positions under the causal mask.
  Every query's softmax runs over the keys it sees without CP, masked ones at Megatron's -10000 as
  in its causal mask, so the result equals CP=1 up to float summation order.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention

from scope_mega.models.context_parallel import causal_mask, chunk_positions, gather_global


class PackedDotProductAttention(DotProductAttention):
    """Megatron's local core attention, THD input one `cu_seqlens` segment at a time, and CP."""

    def __init__(self, config, *args, **kwargs) -> None:
        self.cp = config.context_parallel_size
        if self.cp > 1:  # the parent refuses CP, which `forward` below provides
            config = copy.copy(config)
            config.context_parallel_size = 1
        super().__init__(config, *args, **kwargs)

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
        a time, each -> [s, 1, hidden], concatenated to [t, 1, hidden]. Under CP the inputs hold this
        rank's tokens (`models.context_parallel` layout) and so does the output."""
        if packed_seq_params is not None and packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed input must be THD, got qkv_format={packed_seq_params.qkv_format!r}")
        if self.cp > 1:
            return self._context_parallel(
                query, key, value, attn_mask_type, attention_bias, packed_seq_params
            )
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        attend = super().forward  # (zero-argument super() does not reach into a comprehension)
        parts = [
            attend(query[a:b, None], key[a:b, None], value[a:b, None], None, attn_mask_type, attention_bias)
            for a, b in zip(bounds, bounds[1:])
        ]
        return torch.cat(parts)

    def _context_parallel(self, query, key, value, attn_mask_type, attention_bias, packed_seq_params):
        """This rank's queries against the CP group's keys and values, a sequence (padded: the rows
        together) at a time, at global positions."""
        from megatron.core import parallel_state

        group = parallel_state.get_context_parallel_group()
        rank = parallel_state.get_context_parallel_rank()
        if packed_seq_params is None:  # [s_local, b, heads, dim]: one segment, every row alike
            local_bounds, global_bounds = [0, query.shape[0]], [0, query.shape[0] * self.cp]
        else:  # [t_local, heads, dim]; cu_seqlens are global (Megatron's and TE's convention)
            global_bounds = packed_seq_params.cu_seqlens_q.tolist()
            local_bounds = [b // self.cp for b in global_bounds]
            query, key, value = query[:, None], key[:, None], value[:, None]
        kv = gather_global(torch.cat([key, value], dim=-1), local_bounds, group)  # one gather for both
        keys, values = (t.contiguous() for t in kv.split(key.shape[-1], dim=-1))
        attend = super().forward
        parts = []
        for (la, lb), (ga, gb) in zip(
            zip(local_bounds, local_bounds[1:]), zip(global_bounds, global_bounds[1:])
        ):
            mask = causal_mask(chunk_positions(gb - ga, self.cp, rank).to(query.device), gb - ga)
            parts.append(
                attend(query[la:lb], keys[ga:gb], values[ga:gb], mask, attn_mask_type, attention_bias)
            )
        return torch.cat(parts)
