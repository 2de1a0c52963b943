"""MoLoRA (Zadouri et al. 2023): soft-merged LoRA experts on q, k, v, o and the FFN linears.

Defaults from the paper: r=4, alpha=16, E=10, A ~ N(0, 0.02^2), B = 0, soft routing (top-k is an
option: ``adapter.top_k``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from torch import nn

from moe_lora.adapters.base import LayerPlan, register_adapter
from moe_lora.adapters.layer import routed_lora
from moe_lora.config import MoEConfig


@dataclass
class MoLoRAConfig(MoEConfig):
    name: str = "molora"
    target_modules: List[str] = field(default_factory=lambda: ["all"])
    rank: int = 4
    alpha: float = 16.0
    num_experts: int = 10
    init_A: str = "normal"


@register_adapter("molora", MoLoRAConfig, prefixes=("lora_A", "lora_B", "router.weight"))
def wrap_molora(base: nn.Module, cfg: MoLoRAConfig, plan: LayerPlan) -> nn.Module:
    return routed_lora(base, cfg, plan)
