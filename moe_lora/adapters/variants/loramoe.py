"""LoRAMoE (Dou et al. 2023): LoRA experts on the FFN linears, one soft router per linear, and the
localized balancing constraint (LBC) that splits experts into a world-knowledge group and an
instruction group. The LBC itself lives in :mod:`moe_lora.routing.losses` and is computed by the
recorder from the routers' recorded probabilities.

Defaults follow the released script (r=4, alpha=32, dropout 0.05, 8 experts). The released
script ships with the constraint switched off; the paper's setting is beta=0.1, delta=0.1, which
we use by default. Deviation: padding tokens are masked out of the importance by default (the
released code counts them); ``lbc_mask_padding=false`` restores the original for the LBC (the other
auxiliary losses have their own switch, ``aux_mask_padding``). ``lbc_expert_types`` must fit the
experts of every layer (a layout may give layers different counts).

Observed, and worth knowing when reading expert-group statistics: ``CV^2(I * Q)`` is smallest when
``Q`` is proportional to ``1 / I``, so the constraint as specified (and as the released code
writes it) gives each task type's tokens *less* importance on the group where ``I = 1 + delta``.
On the built-in world, CBQA tokens end up on experts 4-7 and instruction tokens on 0-3 (see the
report's expert-load heatmaps); the balance (CV) effect is as the paper shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from moe_lora.adapters.base import LayerPlan, register_adapter
from moe_lora.adapters.layer import routed_lora
from moe_lora.config import MoEConfig
from moe_lora.errors import ConfigError, require


@dataclass
class LoRAMoEConfig(MoEConfig):
    name: str = "loramoe"
    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.05
    num_experts: int = 8
    lbc_beta: float = 0.1
    lbc_delta: float = 0.1
    lbc_expert_types: Optional[List[int]] = None  # group per expert; None: first half 0 (cbqa), rest 1
    lbc_mask_padding: bool = True  # the LBC's importance over real tokens only (false: as the released code)

    def aux_losses(self) -> dict:
        return super().aux_losses() | {
            "lbc_beta": self.lbc_beta,
            "lbc_delta": self.lbc_delta,
            "lbc_mask_padding": self.lbc_mask_padding,
        }

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lbc_beta >= 0, "adapter.lbc_beta", self.lbc_beta, "must be >= 0")
        require(0.0 <= self.lbc_delta <= 1.0, "adapter.lbc_delta", self.lbc_delta, "must be in [0, 1]")
        if self.lbc_expert_types is not None:  # its length is checked per layer (the layout sets experts)
            require(
                all(t in (0, 1) for t in self.lbc_expert_types),
                "adapter.lbc_expert_types",
                self.lbc_expert_types,
                "entries must be 0 (world knowledge) or 1 (other tasks)",
            )


@register_adapter("loramoe", LoRAMoEConfig, prefixes=("lora_A", "lora_B", "router.weight"))
def wrap_loramoe(base: nn.Module, cfg: LoRAMoEConfig, plan: LayerPlan) -> nn.Module:
    layer = routed_lora(base, cfg, plan)
    if cfg.lbc_expert_types is not None:
        if len(cfg.lbc_expert_types) != plan.num_experts:
            raise ConfigError(
                f"adapter.lbc_expert_types={list(cfg.lbc_expert_types)} has {len(cfg.lbc_expert_types)} "
                f"entries but layer {plan.layer} has {plan.num_experts} experts (adapter.num_experts, or "
                "the layout's experts): give one group per expert of every layer"
            )
        layer.router.expert_type = torch.tensor(cfg.lbc_expert_types, dtype=torch.long, device=base.weight.device)
    return layer
