"""The router: a bias-free linear over the adapted layer's input, softmax, then soft or top-k gates.

It returns dense gates over the real experts (zeros for unselected ones), so the expert compute
stays one batched matmul for soft, top-k and null-expert routing alike, with no host sync. It
reports logits, probabilities and choices to the :class:`RoutingRecorder` (when one is active),
which owns auxiliary losses and statistics.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from moe_lora.routing.losses import AuxLossConfig


class RoutingSink(Protocol):
    """What a router reports to (the recorder): router.py imports nothing from the recorder."""

    active: bool

    def record(
        self, router: Router, logits: torch.Tensor, probs: torch.Tensor, selected: torch.Tensor | None
    ) -> None: ...


def softmax_experts(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last (expert) dimension, run as a softmax over the second-to-last
    dimension of the transposed view: torch's kernel for an inner dimension vectorises across
    tokens, about twice as fast forward and backward as the last-dim kernel when E is a handful."""
    return logits.transpose(-1, -2).softmax(-2).transpose(-1, -2)


def top_choices(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last (expert) dimension. For top-1/top-2 over 16
    or more outputs by k max passes: there ``topk`` over softmax_experts' expert-major layout costs
    twice as much (1,024 tokens, 2 CPU threads: 0.22 vs 0.11 ms at E=16, 0.59 vs 0.32 at E=64);
    below 16 outputs or from k=3 on ``topk`` is as fast or faster. The dense gate and the grouped
    path both choose through this function, so they pick the same experts even where
    probabilities tie."""
    if k > 2 or probs.shape[-1] < 16:
        return probs.topk(k, dim=-1, sorted=False).indices
    first = probs.max(-1, keepdim=True).indices  # max, not argmax: argmax over this layout is 10x slower
    if k == 1:
        return first
    second = probs.scatter(-1, first, -1.0).max(-1, keepdim=True).indices  # probabilities are >= 0
    return torch.cat([first, second], -1)


def route(probs: torch.Tensor, top_k: int | None, num_real: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gates over the real experts and the 0/1 choice mask over all router outputs.

    Soft routing (``top_k=None``) returns the probabilities. Top-k keeps the k most probable
    outputs (real or null) and renormalises the chosen *real* experts' weights among themselves
    (MoLA; AdaMoE), so a token that picks only null experts gets an all-zero gate: no update.
    """
    has_null = probs.shape[-1] > num_real  # slicing only then: a slice's backward zero-fills a copy
    if top_k is None:
        return (probs[..., :num_real] if has_null else probs), None
    idx = top_choices(probs.detach(), top_k)  # selection only: no autograd node
    selected = torch.zeros_like(probs).scatter_(-1, idx, 1.0)
    real = (probs[..., :num_real] * selected[..., :num_real]) if has_null else probs * selected
    return real / real.sum(-1, keepdim=True).clamp_min(1e-12), selected


class Router(nn.Module):
    """``p = softmax(W_r x)`` over ``num_experts + num_null`` outputs (the weight is ``W_r``)."""

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        *,
        top_k: int | None = None,
        num_null: int = 0,
        jitter: float = 0.0,
        fp32: bool = True,
        init: str = "kaiming",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.num_null = num_experts, top_k, num_null
        self.jitter, self.fp32 = jitter, fp32
        self.weight = nn.Parameter(
            torch.empty(num_experts + num_null, d_in, device=device, dtype=torch.float32 if fp32 else dtype)
        )
        if self.weight.device.type != "meta" and init == "normal":
            nn.init.normal_(self.weight, std=0.02)  # the MoV paper's T5X router (adapter.router_init=normal)
        elif self.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default, as in LoRAMoE
        # Expert group of each real expert (LoRAMoE: first half world knowledge, second half the rest).
        groups = (torch.arange(num_experts, device=device) >= num_experts / 2).long()
        self.register_buffer("expert_type", groups, persistent=False)
        self.module_name = ""
        self.stream = "input"  # input | target (an encoder-decoder's decoder tokens): which mask applies
        self.recorder: RoutingSink | None = None
        self.aux: AuxLossConfig | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``W_r x``; with ``fp32`` in float32 even inside a bf16/fp16 autocast region."""
        with torch.autocast(x.device.type, enabled=False) if self.fp32 else contextlib.nullcontext():
            if self.fp32:
                x = x.float()
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return F.linear(x, self.weight.to(x.dtype))

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether ``W_r x`` may be computed inside the expert layer's ``x @ [A | W_r^T]`` matmul:
        not with jitter, and with ``fp32`` only where that matmul runs in float32 (no autocast)."""
        if self.training and self.jitter > 0:
            return False
        return not self.fp32 or (x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.logits(x), x.dtype)

    def gate(self, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Gates from router logits (softmax, routing, recording); the second half of forward."""
        probs = softmax_experts(logits.float() if self.fp32 else logits)
        gate, selected = route(probs, self.top_k, self.num_experts)
        if self.recorder is not None and self.recorder.active:
            self.recorder.record(self, logits, probs, selected)
        return gate.to(dtype)

    def choose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k routing as each token's k choices: ``(weights, experts)``, both ``(..., k)``, for
        the grouped expert compute. The weights are the dense gate's values at the chosen experts
        (the chosen real experts' probabilities renormalised among themselves, so the gradients
        match the dense path's), without building the ``(..., E)`` gate or choosing twice; a pick
        of a null expert gets weight 0 and the index ``num_experts`` (one past the real ones)."""
        logits = self.logits(x)
        probs = softmax_experts(logits.float() if self.fp32 else logits)
        experts = top_choices(probs.detach(), self.top_k)
        if self.recorder is not None and self.recorder.active:
            self.recorder.record(self, logits, probs, torch.zeros_like(probs).scatter_(-1, experts, 1.0))
        weights = probs.gather(-1, experts)
        if self.num_null:
            weights = weights * (experts < self.num_experts)
            experts = experts.clamp_max(self.num_experts)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        return weights.to(x.dtype), experts

    def extra_repr(self) -> str:
        k = "soft" if self.top_k is None else f"top_k={self.top_k}"
        return f"experts={self.num_experts}, null={self.num_null}, {k}"
