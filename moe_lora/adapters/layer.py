"""The expert layer: a frozen base linear plus a low-rank update of E experts, computed at once.

Experts are stored concatenated, ``lora_A`` (d_in, E*r) and ``lora_B`` (E*r, d_out), next to the
router weight: three trainable tensors per adapted linear. The gate (with the alpha/r scaling
folded in) scales the small ``T x E*r`` hidden, never a ``T x d`` tensor, and the update is added
into the base output with one ``addmm``. There is no Python loop over experts. This layout is also
the saved format. Plain LoRA is the case E=1 without a router.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_lora.routing.router import Router


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored transposed)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":
        d_in, d_out = base.weight.shape
        return d_in, d_out
    raise TypeError(f"cannot adapt a {type(base).__name__}; only nn.Linear and Conv1D")


class LoRAExperts(nn.Module):
    """``y = W0 x + s * sum_e g_e(x) B_e A_e dropout(x)`` with ``s = alpha / r``."""

    def __init__(
        self, base: nn.Module, *, rank: int, alpha: float, num_experts: int = 1, dropout: float = 0.0,
        router: Router | None = None, init_A: str = "kaiming",
    ) -> None:
        super().__init__()
        if router is None and num_experts != 1:
            raise ValueError("several experts need a router")
        self.base = base
        self.d_in, self.d_out = linear_dims(base)
        self.rank, self.num_experts, self.scaling = rank, num_experts, alpha / rank
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(self.d_in, num_experts * rank, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts * rank, self.d_out, dtype=weight.dtype, device=weight.device))
        self.router = router
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_A(init_A)

    @torch.no_grad()
    def reset_A(self, init: str) -> None:
        """peft's kaiming-uniform(a=sqrt 5) on each (r, d_in) expert is U(-1/sqrt d_in, 1/sqrt d_in)."""
        if self.lora_A.device.type == "meta":
            return
        if init == "normal":
            self.lora_A.normal_(0.0, 0.02)
        else:
            bound = 1.0 / math.sqrt(self.d_in)
            self.lora_A.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = self.lora_dropout(x).to(self.lora_A.dtype) @ self.lora_A
        scale = self.scaling
        if self.router is not None:
            gate = self.router(x).to(h.dtype) * self.scaling
            h = (h.unflatten(-1, (self.num_experts, self.rank)) * gate.unsqueeze(-1)).flatten(-2)
            scale = 1.0
        flat = torch.addmm(out.reshape(-1, self.d_out), h.reshape(-1, h.shape[-1]).to(out.dtype),
                           self.lora_B.to(out.dtype), alpha=scale)
        return flat.view_as(out)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, experts={self.num_experts}"
