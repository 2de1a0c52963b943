"""IA3 (peft): learned vectors initialised to 1. On attention targets (k, v) they scale the module
output; on FFN targets (down_proj) they scale the module input, as peft's ``feedforward_modules``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from moe_lora.adapters.base import LayerPlan, register_adapter
from moe_lora.adapters.layer import linear_dims
from moe_lora.config import AdapterConfig


@dataclass
class IA3Config(AdapterConfig):
    name: str = "ia3"
    target_modules: List[str] = field(default_factory=lambda: ["key", "value", "ffn_out"])


class IA3Linear(nn.Module):
    """``y = l * W0 x`` (output site) or ``y = W0 (l * x)`` (input site)."""

    def __init__(self, base: nn.Module, scale_input: bool, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base, self.scale_input = base, scale_input
        d_in, d_out = linear_dims(base)
        w = base.weight
        self.ia3_l = nn.Parameter(torch.ones(d_in if scale_input else d_out, dtype=dtype or w.dtype, device=w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_input:
            return self.base(x * self.ia3_l.to(x.dtype))
        out = self.base(x)
        return out * self.ia3_l.to(out.dtype)


@register_adapter("ia3", IA3Config)
def wrap_ia3(base: nn.Module, cfg: IA3Config, plan: LayerPlan) -> nn.Module:
    return IA3Linear(base, scale_input=plan.group == "ffn", dtype=plan.dtype)
