"""Optimiser and learning-rate schedule shared by pretraining and fine-tuning."""

from __future__ import annotations

import torch
from transformers import get_scheduler


def adamw_with_schedule(
    params: list[torch.nn.Parameter], lr: float, weight_decay: float, scheduler: str, warmup: int, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (no weight decay on 1-D tensors, as in HF Trainer) plus a transformers schedule."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    sched = get_scheduler(scheduler, opt, num_warmup_steps=warmup, num_training_steps=steps)
    return opt, sched
