"""Optimiser and learning-rate schedule shared by pretraining and fine-tuning."""

from __future__ import annotations

import torch
from transformers import get_scheduler
from transformers.optimization import Adafactor

Params = list[torch.nn.Parameter]


def param_groups(params: Params, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D tensors (biases, gates, IA3 vectors), as in HF Trainer."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def t5x_adafactor(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """``recipe.optimizer=adafactor_t5x``: Adafactor as the MoV paper trains T5 in T5X (for-ai's
    released gin configs): parameter-scaled updates (lr x max(1e-3, RMS(param))), update clipping
    at RMS 1.0, second-moment decay 1 - t^-0.8, no first moment (no momentum), at the recipe's
    constant rate (3e-4 in the paper, 1e-3 for full fine-tuning), with T5X's factoring rule
    (:class:`T5XAdafactor`). transformers' Adafactor has the same update otherwise (eps 1e-30 and
    1e-3 as T5X's epsilon1 / epsilon2)."""

    class T5XAdafactor(Adafactor):
        """T5X factors a tensor's second moment only when its second-largest dimension is at least
        ``min_dim_size_to_factor`` = 128 (a LoRA A of rank 4 keeps a full one); transformers
        factors every matrix. Factored tensors are factored over their last two dimensions as in
        transformers (T5X picks the two largest: the same for matrices)."""

        @staticmethod
        def _get_options(param_group, param_shape):
            dims = sorted(param_shape)
            return len(dims) >= 2 and dims[-2] >= 128, param_group["beta1"] is not None

    return T5XAdafactor(
        groups,
        lr=lr,
        scale_parameter=True,
        relative_step=False,
        warmup_init=False,
        clip_threshold=1.0,
        decay_rate=-0.8,
        beta1=None,
    )


def can_fuse(params: Params) -> bool:
    """torch's fused AdamW (one kernel over parameter, gradient and both moments) takes plain
    floating tensors on the CPU or a GPU; sharded (FSDP2 DTensor) parameters keep the default."""
    return bool(params) and all(
        type(p) is torch.nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )


def make_optimizer(
    name: str, params: Params, lr: float, weight_decay: float, fused: bool = True
) -> torch.optim.Optimizer:
    """``adamw`` (torch's, fused where :func:`can_fuse`: 2.7x faster than the default per step on
    10.6M float32 parameters on one CPU thread, measured) or ``adafactor``: transformers' Adafactor
    with a fixed learning rate (``scale_parameter=False, relative_step=False, warmup_init=False``),
    the way the MoV paper and T-Few train their vectors; its relative-step mode would ignore
    ``recipe.lr``."""
    groups = param_groups(params, weight_decay)
    if name == "adafactor_t5x":
        return t5x_adafactor(groups, lr)
    if name == "adafactor":
        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused and can_fuse(params))
    raise ValueError(f"unknown optimizer {name!r}")  # RecipeConfig names the key before this


def optimizer_with_schedule(
    name: str,
    params: Params,
    lr: float,
    weight_decay: float,
    scheduler: str,
    warmup: int,
    steps: int,
    fused: bool = True,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The recipe's optimiser plus a transformers schedule (``constant`` for Adafactor, checked by
    :class:`~moe_lora.config.RecipeConfig`)."""
    opt = make_optimizer(name, params, lr, weight_decay, fused)
    return opt, get_scheduler(scheduler, opt, num_warmup_steps=warmup, num_training_steps=steps)


def adamw_with_schedule(
    params: Params, lr: float, weight_decay: float, scheduler: str, warmup: int, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW plus a schedule (pretraining of the world model: unfused, so that the cached world
    models pretrained before fused fine-tuning stay the ones a fresh machine pretrains)."""
    return optimizer_with_schedule("adamw", params, lr, weight_decay, scheduler, warmup, steps, fused=False)
