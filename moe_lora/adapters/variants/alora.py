"""ALoRA (Liu et al. 2024; no public code): a diagonal gate between A and B that prunes and
reallocates rank.

``delta = s * B diag(g * active) A`` with gates ``g`` initialised to 1. Each linear has capacity
``max_rank`` and starts with ``rank`` active components, so the total budget is ``rank`` times the
number of adapted linears. On the recipe's schedule (``recipe.realloc_every``) every active
component is scored by how much the validation loss rises when it is ablated (AB-LoRA); the
``recipe.realloc_prune`` lowest-scoring components are switched off and the same number is
granted to the linears whose components matter most (highest mean score, with spare capacity),
so the budget is kept. A granted component starts with a fresh A column and a zero B row, so the
function is unchanged at the moment of reallocation, and with zeroed optimiser moments for those
entries and its gate, so its first update comes from its own new gradient only (a re-granted
component's stale AdamW momentum would otherwise move the fresh B row on the next step).

Deviation: the paper ablates with a small held-out set per reallocation round; we use one fixed
batch of validation examples (``recipe.realloc_val_examples``), which keeps runs deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List

import torch
from torch import nn

from moe_lora.adapters.base import HookContext, LayerPlan, register_adapter
from moe_lora.adapters.layer import LoRAExperts, kaiming_uniform_
from moe_lora.config import LowRankConfig
from moe_lora.errors import require


@dataclass
class ALoRAConfig(LowRankConfig):
    name: str = "alora"
    target_modules: List[str] = field(default_factory=lambda: ["all"])
    rank: int = 8
    alpha: float = 16.0
    max_rank: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.max_rank >= self.rank, "adapter.max_rank", self.max_rank, f"must be >= adapter.rank={self.rank}")


class ALoRALinear(LoRAExperts):
    """A LoRA of capacity ``max_rank`` whose components are switched by ``adapter_active``."""

    def __init__(
        self, base: nn.Module, rank: int, max_rank: int, alpha: float, dropout: float, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(base, rank=max_rank, alpha=alpha, dropout=dropout, dtype=dtype)
        self.scaling = alpha / rank  # the scaling of the initial rank, kept when ranks move
        self.alora_gate = nn.Parameter(torch.ones(max_rank, dtype=self.lora_A.dtype, device=self.lora_A.device))
        active = torch.zeros(max_rank, dtype=self.lora_A.dtype, device=self.lora_A.device)
        active[:rank] = 1.0
        self.register_buffer("adapter_active", active)

    def scale_hidden(self, h: torch.Tensor, gate: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        return h * (self.alora_gate * self.adapter_active), self.scaling

    @property
    def active_rank(self) -> int:
        return int(self.adapter_active.sum().item())

    @torch.no_grad()
    def grant(self, index: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Switch component ``index`` on with a fresh A column, a zero B row, and (given the
        optimiser) zero optimiser state for those entries and the gate."""
        column = torch.empty(self.d_in, 1, dtype=self.lora_A.dtype, device=self.lora_A.device)
        kaiming_uniform_(column, self.d_in)
        self.lora_A[:, index] = column[:, 0]
        self.lora_B[index].zero_()
        self.alora_gate[index] = 1.0
        self.adapter_active[index] = 1.0
        if optimizer is not None:
            for param, dim in ((self.lora_A, 1), (self.lora_B, 0), (self.alora_gate, 0)):
                zero_state_slice(optimizer, param, dim, index)


@torch.no_grad()
def zero_state_slice(optimizer: torch.optim.Optimizer, param: torch.Tensor, dim: int, index: int) -> None:
    """Zero the optimiser's per-element state of ``param.select(dim, index)``: AdamW's moments, and
    Adafactor's factored row / column statistics where the slice is a whole row / column. Step
    counters are per tensor and stay."""
    last = param.dim() - 1
    for key, value in optimizer.state.get(param, {}).items():
        if not torch.is_tensor(value) or value.dim() == 0:
            continue
        # elementwise state (AdamW's moments), or Adafactor's row statistic (a mean over the last dim)
        if value.shape == param.shape or (key == "exp_avg_sq_row" and dim == last - 1):
            value.select(dim, index).zero_()
        elif key == "exp_avg_sq_col" and dim == last:  # Adafactor: mean over the second-to-last dim
            value.select(dim - 1, index).zero_()


def alora_layers(model: nn.Module) -> dict[str, ALoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ALoRALinear)}


@torch.no_grad()
def score_components(layers: dict[str, ALoRALinear], val_loss: Callable[[], float]) -> dict[tuple[str, int], float]:
    """Validation-loss increase when each active component alone is ablated."""
    full = val_loss()
    scores = {}
    for name, layer in layers.items():
        for i in layer.adapter_active.nonzero().flatten().tolist():
            layer.adapter_active[i] = 0.0
            scores[(name, i)] = val_loss() - full
            layer.adapter_active[i] = 1.0
    return scores


def reallocate(
    layers: dict[str, ALoRALinear],
    val_loss: Callable[[], float],
    prune: int,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Prune the ``prune`` least useful components, grant as many to the most useful linears
    (their optimiser state zeroed, given the optimiser)."""
    scores = score_components(layers, val_loss)
    pruned = sorted(scores, key=scores.get)[:prune]
    with torch.no_grad():
        for name, i in pruned:
            layers[name].adapter_active[i] = 0.0
    mean = {
        n: sum(v for (m, _), v in scores.items() if m == n) / max(1, sum(m == n for m, _ in scores)) for n in layers
    }
    granted = []
    order = sorted(layers, key=lambda n: -mean[n])
    while len(granted) < len(pruned):
        open_layers = [n for n in order if layers[n].active_rank < layers[n].adapter_active.numel()]
        if not open_layers:
            break
        for name in open_layers[: len(pruned) - len(granted)]:
            free = (layers[name].adapter_active == 0).nonzero().flatten()
            layers[name].grant(int(free[0]), optimizer)
            granted.append(name)
    return {"pruned": [f"{n}[{i}]" for n, i in pruned], "granted": granted}


def make_alora_hook(model: nn.Module, cfg: ALoRAConfig, ctx: HookContext):
    layers = alora_layers(model)
    every = ctx.recipe.realloc_every or max(1, ctx.recipe.max_steps // 4)

    def hook(state: Any) -> None:
        if ctx.recipe.realloc_prune > 0 and state.step % every == 0 and state.step < ctx.recipe.max_steps:
            moved = reallocate(layers, ctx.val_loss, ctx.recipe.realloc_prune, state.optimizer)
            ctx.log({"step": state.step, "alora_pruned": moved["pruned"], "alora_granted": moved["granted"]})

    return hook


def alora_report(model: nn.Module) -> dict:
    return {"alora_ranks": {n: m.active_rank for n, m in alora_layers(model).items()}}


@register_adapter(
    "alora", ALoRAConfig, make_hook=make_alora_hook, report=alora_report, prefixes=("lora_A", "lora_B", "alora_gate")
)
def wrap_alora(base: nn.Module, cfg: ALoRAConfig, plan: LayerPlan) -> nn.Module:
    return ALoRALinear(
        base,
        rank=plan.rank,
        max_rank=max(cfg.max_rank, plan.rank),
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        dtype=plan.dtype,
    )
