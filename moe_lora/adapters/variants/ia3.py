"""IA3 (peft): learned vectors initialised to 1. On attention targets (k, v) they scale the module
output; on the FFN output projection (down_proj, fc2, ...) they scale its input, as peft's
``feedforward_modules`` (the ``ffn_out`` role). On a fused q|k|v linear targeted by role
(``key``, ``value``) only those roles' columns are scaled (one vector per role, per the family's
column layout), so a fused checkpoint trains exactly the parameters of its unfused twin; a fused
linear targeted by name or block is scaled whole, as peft does. On an MoE base's fused routed
experts each expert gets its own vectors (:class:`moe_lora.adapters.experts.IA3OnExperts`): the
input of ``down_proj``, the whole output of ``gate_up_proj`` (targeting only ``ffn_gate`` or
``ffn_up`` of it is refused)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from moe_lora.adapters.base import LayerPlan, register_adapter
from moe_lora.adapters.experts import ia3_on_experts
from moe_lora.adapters.layer import WrapsLinear, linear_dims
from moe_lora.adapters.slices import SlicedOutput
from moe_lora.config import AdapterConfig


@dataclass
class IA3Config(AdapterConfig):
    name: str = "ia3"
    target_modules: List[str] = field(default_factory=lambda: ["key", "value", "ffn_out"])


class IA3Scale(nn.Module):
    """``h * l`` with a learned vector ``l`` (ones at init)."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.ia3_l.to(h.dtype)


class IA3Linear(WrapsLinear):
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


@register_adapter("ia3", IA3Config, slices_fused=True, prefixes=("ia3_l",), wrap_experts=ia3_on_experts)
def wrap_ia3(base: nn.Module, cfg: IA3Config, plan: LayerPlan) -> nn.Module:
    site = plan.site
    if site.partial:
        columns = {r: site.fused.columns(r) for r in site.targeted}
        parts = {r: IA3Scale(len(c), plan.dtype, base.weight.device) for r, c in columns.items()}
        return SlicedOutput(base, parts, columns)
    scale_input = site.input_site  # peft's feedforward_modules: the input of ffn_out
    return IA3Linear(base, scale_input=scale_input, dtype=plan.dtype)
