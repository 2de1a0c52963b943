"""MoLA (Gao et al. 2024): LoRA experts on every target linear with a layer-dependent number of
experts (``layout=``), top-2 routing with renormalisation.

Defaults from the released code (GCYZSL/MoLA): r=8, alpha=16, dropout 0.05, all seven linears,
k=2. The Switch-style load-balance loss is optional in MoLA; we leave it off (``lb_weight=0``) and
the paper's weight is 1e-3 (``adapter.lb_weight=1e-3``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from torch import nn

from moe_lora.adapters.base import LayerPlan, register_adapter
from moe_lora.adapters.layer import routed_lora
from moe_lora.config import MoEConfig


@dataclass
class MoLAConfig(MoEConfig):
    name: str = "mola"
    target_modules: List[str] = field(default_factory=lambda: ["all"])
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    num_experts: int = 8
    top_k: Optional[int] = 2


@register_adapter("mola", MoLAConfig, prefixes=("lora_A", "lora_B", "router.weight"))
def wrap_mola(base: nn.Module, cfg: MoLAConfig, plan: LayerPlan) -> nn.Module:
    return routed_lora(base, cfg, plan)
