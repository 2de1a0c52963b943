"""HydraLoRA (Tian et al. 2024): one shared A per adapted linear, N heads B_i (zero init), a soft
router: ``y = W0 x + s * sum_i p_i B_i A x``. ``A x`` is computed once per token
(``LoRAExperts(shared_A=True)``). Defaults from the released code: r=4, alpha=32, N=4 on
gate/up/down. The paper's parameter percentages exclude the router (`moe-lora params` shows both).
``expert_compute=grouped`` is refused: with one shared A there is nothing per expert to group
(``A x`` is computed once), and the layer would quietly compute dense.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moe_lora.adapters.base import LayerPlan, register_adapter
from moe_lora.adapters.layer import routed_lora
from moe_lora.config import MoEConfig
from moe_lora.errors import require


@dataclass
class HydraLoRAConfig(MoEConfig):
    name: str = "hydralora"
    rank: int = 4
    alpha: float = 32.0
    num_experts: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.expert_compute == "dense",
            "adapter.expert_compute",
            self.expert_compute,
            "must be dense for HydraLoRA (its shared A is computed once for every head; nothing to group)",
        )


@register_adapter("hydralora", HydraLoRAConfig, prefixes=("lora_A", "lora_B", "router.weight"))
def wrap_hydralora(base: nn.Module, cfg: HydraLoRAConfig, plan: LayerPlan) -> nn.Module:
    return routed_lora(base, cfg, plan, shared_A=True)
