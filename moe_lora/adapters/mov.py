"""MoV (Zadouri et al. 2023): IA3 experts with soft merging, ``h' = h * sum_e p_e(h) v_e``.

Every ``v_e`` starts at 1 (identity at init). The router's input is the activation it rescales:
for k/v outputs it routes each head separately with one router shared across heads (its input is
one head's slice, so ``router.weight`` is (E, head_dim)); for the FFN it routes on the intermediate
activation that enters down_proj. Defaults: E=10, soft routing, router in fp32, sites k_proj and
v_proj outputs and down_proj input. The schema is :class:`RoutedConfig`'s, without the low-rank
fields (rank, alpha, dropout, init_A) or null experts and grouped compute, which IA3 experts do not
have: setting one fails at composition instead of being ignored. The paper trains with Adafactor at
a constant rate: ``recipe.optimizer=adafactor recipe.scheduler=constant`` (the MoV arms set it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from moe_lora.adapters.base import LayerPlan, register_adapter
from moe_lora.adapters.layer import linear_dims
from moe_lora.config import RoutedConfig
from moe_lora.errors import ConfigError
from moe_lora.routing.router import Router


@dataclass
class MoVConfig(RoutedConfig):
    name: str = "mov"
    target_modules: List[str] = field(default_factory=lambda: ["key", "value", "ffn_out"])
    num_experts: int = 10


class MoVLinear(nn.Module):
    """IA3 experts ``ia3_v`` (E, d) merged by a router on the rescaled activation."""

    def __init__(self, base: nn.Module, router: Router, scale_input: bool, head_dim: int,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base, self.router, self.scale_input = base, router, scale_input
        d_in, d_out = linear_dims(base)
        self.dim = d_in if scale_input else d_out
        self.head_dim = self.dim if scale_input else head_dim
        if self.dim % self.head_dim:
            raise ConfigError(f"adapter=mov routes the output of a {self.dim}-wide linear per head, but the model's "
                              f"head size {self.head_dim} does not divide it (model.head_dim)")
        w = base.weight
        self.ia3_v = nn.Parameter(torch.ones(router.num_experts, self.dim, dtype=dtype or w.dtype, device=w.device))

    def _rescale(self, h: torch.Tensor) -> torch.Tensor:
        heads = h.unflatten(-1, (self.dim // self.head_dim, self.head_dim))  # (..., H, hd)
        gate = self.router(heads).to(h.dtype)  # (..., H, E): one router shared by the heads
        vectors = self.ia3_v.unflatten(-1, (self.dim // self.head_dim, self.head_dim))  # (E, H, hd)
        scale = torch.einsum("...he,ehd->...hd", gate, vectors.to(h.dtype))
        return (heads * scale).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_input:
            return self.base(self._rescale(x))
        return self._rescale(self.base(x))


@register_adapter("mov", MoVConfig)
def wrap_mov(base: nn.Module, cfg: MoVConfig, plan: LayerPlan) -> nn.Module:
    d_in, _d_out = linear_dims(base)
    scale_input = plan.group == "ffn"
    router_dim = d_in if scale_input else plan.head_dim
    router = Router(router_dim, plan.num_experts, top_k=plan.top_k, jitter=cfg.router_jitter, fp32=cfg.router_fp32,
                    device=base.weight.device, dtype=plan.dtype)
    return MoVLinear(base, router, scale_input, plan.head_dim, dtype=plan.dtype)
