"""MELoRA (Ren et al. 2024): n mini-LoRAs on a block diagonal; not routed.

The input and the output are split into n equal slices; mini-LoRA i (rank r) maps input slice i to
output slice i, so the update is block-diagonal with effective rank n*r at the parameter cost of
one rank-r LoRA on the full matrix. All minis run as one batched ``einsum``. Scaling alpha/r per
mini. Defaults from the paper: q, v with r=1, n=8 (compare LoRA r=8 and r=64).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from moe_lora.adapters.base import LayerPlan, register_adapter
from moe_lora.adapters.layer import WrapsLinear, base_and_update, kaiming_uniform_, linear_dims
from moe_lora.config import LowRankConfig
from moe_lora.errors import ConfigError, require


@dataclass
class MELoRAConfig(LowRankConfig):
    name: str = "melora"
    target_modules: List[str] = field(default_factory=lambda: ["query", "value"])
    rank: int = 1
    alpha: float = 1.0
    num_minis: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.num_minis >= 1, "adapter.num_minis", self.num_minis, "must be >= 1")


class MELoRALinear(WrapsLinear):
    """``y = W0 x + s * blockdiag(B_1 A_1, ..., B_n A_n) x``; A: (n, d_in/n, r), B: (n, r, d_out/n)."""

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        num_minis: int,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.d_in, self.d_out = linear_dims(base)
        if self.d_in % num_minis or self.d_out % num_minis:
            raise ConfigError(
                f"adapter.num_minis={num_minis} must divide the input ({self.d_in}) and output "
                f"({self.d_out}) sizes of every target linear"
            )
        self.n, self.rank, self.scaling = num_minis, rank, alpha / rank
        w = base.weight
        dtype = dtype or w.dtype
        self.lora_A = nn.Parameter(torch.empty(num_minis, self.d_in // num_minis, rank, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(num_minis, rank, self.d_out // num_minis, dtype=dtype, device=w.device))
        kaiming_uniform_(self.lora_A, self.d_in // num_minis)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # autocast casts by itself, without a saved copy
            xs = xs.to(self.lora_A.dtype)
        xs = xs.unflatten(-1, (self.n, -1))  # (..., n, d_in/n)
        h = torch.einsum("...ni,nir->...nr", xs, self.lora_A)
        delta = torch.einsum("...nr,nro->...no", h, self.lora_B).reshape(-1, self.d_out)
        return base_and_update(self.base, x, lambda out: out.add_(delta.to(out.dtype), alpha=self.scaling))

    def delta_weight(self) -> torch.Tensor:
        """The dense (d_out, d_in) update, for tests and merging."""
        blocks = [self.scaling * (self.lora_A[i] @ self.lora_B[i]).T for i in range(self.n)]
        return torch.block_diag(*blocks)


@register_adapter("melora", MELoRAConfig, prefixes=("lora_A", "lora_B"))
def wrap_melora(base: nn.Module, cfg: MELoRAConfig, plan: LayerPlan) -> nn.Module:
    return MELoRALinear(
        base, rank=plan.rank, alpha=cfg.alpha, num_minis=cfg.num_minis, dropout=cfg.dropout, dtype=plan.dtype
    )
