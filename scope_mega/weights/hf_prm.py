"""Reference Hugging Face implementation of the Qwen2.5-Math-PRM-7B layout (that checkpoint ships it
as remote code, which we never download): the ground truth for the PRM weight names."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2PreTrainedModel


class Qwen2ForProcessRewardModel(Qwen2PreTrainedModel):
    """Qwen2 backbone (`model.*`, no `lm_head`) and a two-class head `score` = Linear(h, h) -> ReLU ->
    Linear(h, 2); a step's score is softmax(class 1) at its separator token."""

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen2Model(config)
        h = config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token class logits [batch, seq, 2]."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.score(out.last_hidden_state)
