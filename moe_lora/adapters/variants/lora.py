"""Plain LoRA (peft defaults): ``y = W0 x + s * B A dropout(x)``, A kaiming-uniform, B = 0.

Numerically equal to peft's LoRA for equal weights (``lora_A == peft lora_A.weight.T``). On an MoE
base's fused routed experts, every expert gets its own A_e, B_e (:mod:`moe_lora.adapters.experts`,
peft's ``target_parameters``), of rank ``adapter.expert_rank``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moe_lora.adapters.base import LayerPlan, register_adapter
from moe_lora.adapters.experts import check_expert_rank, lora_on_experts
from moe_lora.adapters.layer import LoRAExperts
from moe_lora.config import LowRankConfig


@dataclass
class LoRAConfig(LowRankConfig):
    name: str = "lora"
    # each routed expert's rank on fused MoE experts: rank (adapter.rank, as peft's target_parameters
    # with r), rank/num_experts (peft's advice: the projection's total stays r), or a number
    expert_rank: str = "rank"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_expert_rank(self.expert_rank)


@register_adapter("lora", LoRAConfig, prefixes=("lora_A", "lora_B"), wrap_experts=lora_on_experts)
def wrap_lora(base: nn.Module, cfg: LoRAConfig, plan: LayerPlan) -> nn.Module:
    return LoRAExperts(base, rank=plan.rank, alpha=cfg.alpha, dropout=cfg.dropout, init_A=cfg.init_A, dtype=plan.dtype)
