"""Optimiser and learning-rate schedule shared by pretraining and fine-tuning."""

from __future__ import annotations

import torch
from transformers import get_scheduler

Params = list[torch.nn.Parameter]


def param_groups(params: Params, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D tensors (biases, gates, IA3 vectors), as in HF Trainer."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(name: str, params: Params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``adamw`` (torch) or ``adafactor``: transformers' Adafactor with a fixed learning rate
    (``scale_parameter=False, relative_step=False, warmup_init=False``), the way the MoV paper and
    T-Few train their vectors; its relative-step mode would ignore ``recipe.lr``."""
    groups = param_groups(params, weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")  # RecipeConfig names the key before this


def optimizer_with_schedule(
    name: str, params: Params, lr: float, weight_decay: float, scheduler: str, warmup: int, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The recipe's optimiser plus a transformers schedule (``constant`` for Adafactor, checked by
    :class:`~moe_lora.config.RecipeConfig`)."""
    opt = make_optimizer(name, params, lr, weight_decay)
    return opt, get_scheduler(scheduler, opt, num_warmup_steps=warmup, num_training_steps=steps)


def adamw_with_schedule(
    params: Params, lr: float, weight_decay: float, scheduler: str, warmup: int, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW plus a schedule (pretraining of the world model)."""
    return optimizer_with_schedule("adamw", params, lr, weight_decay, scheduler, warmup, steps)
