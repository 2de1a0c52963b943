"""AdaMoE (Zeng et al. 2024): null experts (output zero) join the router; one softmax over real
and null experts, top-k, the chosen real experts' weights renormalised among themselves; a token
that picks only null experts gets no update. The routing itself is shared
(:func:`moe_lora.routing.router.route`); the recorder reports ``real_experts_per_token``.

Our defaults: 8 real LoRA experts (r=8, alpha=16) on all linears, 4 null experts, top-4 (the
survey's top-4 over real and null experts), and AdaMoE's load-balance loss with the null experts'
load replaced by their mean, weight 1e-2. ``num_null_experts=0`` is plain top-k with the
Switch / MoLA load balance (AdaMoE's form reduces to it): the baseline arm of the null-expert
comparison, equal to the null-expert arms in every other field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from torch import nn

from moe_lora.adapters.base import LayerPlan, register_adapter
from moe_lora.adapters.layer import routed_lora
from moe_lora.config import MoEConfig


@dataclass
class AdaMoEConfig(MoEConfig):
    name: str = "adamoe"
    target_modules: List[str] = field(default_factory=lambda: ["all"])
    rank: int = 8
    alpha: float = 16.0
    num_experts: int = 8
    num_null_experts: int = 4
    top_k: Optional[int] = 4
    lb_weight: float = 0.01


@register_adapter("adamoe", AdaMoEConfig, prefixes=("lora_A", "lora_B", "router.weight"))
def wrap_adamoe(base: nn.Module, cfg: AdaMoEConfig, plan: LayerPlan) -> nn.Module:
    return routed_lora(base, cfg, plan)
