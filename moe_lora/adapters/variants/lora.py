"""Plain LoRA (peft defaults): ``y = W0 x + s * B A dropout(x)``, A kaiming-uniform, B = 0.

Numerically equal to peft's LoRA for equal weights (``lora_A == peft lora_A.weight.T``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moe_lora.adapters.base import LayerPlan, register_adapter
from moe_lora.adapters.layer import LoRAExperts
from moe_lora.config import LowRankConfig


@dataclass
class LoRAConfig(LowRankConfig):
    name: str = "lora"


@register_adapter("lora", LoRAConfig, prefixes=("lora_A", "lora_B"))
def wrap_lora(base: nn.Module, cfg: LoRAConfig, plan: LayerPlan) -> nn.Module:
    return LoRAExperts(base, rank=plan.rank, alpha=cfg.alpha, dropout=cfg.dropout, init_A=cfg.init_A, dtype=plan.dtype)
