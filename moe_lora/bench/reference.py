"""A naive MoE-LoRA layer written the way released research code does it: a Python loop over
per-expert ``nn.Linear`` A/B pairs, the gate applied to each expert's full ``T x d_out`` output,
and a host sync to skip unused experts. Kept in the package so that tests can check our
vectorised layer against it and the benchmark can measure the difference.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_lora.adapters.layer import LoRAExperts, linear_dims
from moe_lora.routing.router import Router


class LoopMoELoRA(nn.Module):
    """``y = W0 x + sum_e g_e(x) * (s * B_e A_e x)`` with one Python iteration per expert."""

    def __init__(
        self,
        base: nn.Module,
        num_experts: int,
        rank: int,
        alpha: float,
        top_k: int | None = None,
        num_null: int = 0,
        shared_A: bool = False,
    ) -> None:
        super().__init__()
        d_in, d_out = linear_dims(base)
        self.base, self.num_experts = base, num_experts
        self.scaling, self.shared_A = alpha / rank, shared_A
        n_a = 1 if shared_A else num_experts
        self.experts_A = nn.ModuleList(nn.Linear(d_in, rank, bias=False) for _ in range(n_a))
        self.experts_B = nn.ModuleList(nn.Linear(rank, d_out, bias=False) for _ in range(num_experts))
        # the shared router (softmax, top-k, null experts, reporting to a recorder when attached):
        # what is naive here is the expert compute, so that is all the comparison measures
        self.router = Router(d_in, num_experts, top_k=top_k, num_null=num_null)

    @classmethod
    def from_ours(cls, layer: LoRAExperts) -> LoopMoELoRA:
        """The same weights as one of our expert layers."""
        r, router = layer.rank, layer.router
        ref = cls(layer.base, layer.num_experts, r, layer.scaling * r, router.top_k, router.num_null, layer.shared_A)
        with torch.no_grad():
            for e, lin in enumerate(ref.experts_A):
                lin.weight.copy_(layer.lora_A[:, e * r : (e + 1) * r].T)
            for e, lin in enumerate(ref.experts_B):
                lin.weight.copy_(layer.lora_B[e * r : (e + 1) * r].T)
            ref.router.weight.copy_(router.weight)
        # the layer's device; experts in its dtype, the router in the router's (float32 by default)
        ref.experts_A.to(device=layer.lora_A.device, dtype=layer.lora_A.dtype)
        ref.experts_B.to(device=layer.lora_B.device, dtype=layer.lora_B.dtype)
        ref.router.to(device=router.weight.device, dtype=router.weight.dtype)
        ref.router.fp32, ref.router.jitter = router.fp32, router.jitter
        return ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        gate = self.router(x)
        used = (gate.reshape(-1, self.num_experts) > 0).any(0).tolist()  # host sync, as released code does
        shared = self.experts_A[0](x) if self.shared_A else None
        for e in range(self.num_experts):
            if not used[e]:
                continue
            h = shared if self.shared_A else self.experts_A[e](x)
            out = out + gate[..., e : e + 1].to(x.dtype) * (self.experts_B[e](h) * self.scaling)
        return out
