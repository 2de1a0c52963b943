"""The adapter registry: a variant registers its config dataclass and its layer factory once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from torch import nn

from moe_lora.config import AdapterConfig
from moe_lora.registry import Registry
from moe_lora.structure import Site


@dataclass(frozen=True)
class LayerPlan:
    """What one adapted linear gets, after the layout is resolved for its layer."""

    layer: int | None
    num_experts: int
    rank: int
    top_k: int | None
    group: str | None = None  # the model.modules group of the linear (attention, ffn, ...)
    head_dim: int = 0  # the model's head size (config.json's head_dim, else hidden // heads), for MoV
    dtype: torch.dtype = torch.float32  # adapter weights, routers and buffers (adapter.dtype)
    site: Site | None = None  # the linear's roles and fused layout (moe_lora.structure)


@dataclass
class HookContext:
    """What a training hook may use besides the training state."""

    val_loss: Callable[[], float]  # loss on a fixed validation batch, model in eval mode
    recipe: Any
    log: Callable[[dict], None]


# (base linear, adapter config, plan) -> the module that replaces the base linear
WrapFn = Callable[[nn.Module, AdapterConfig, LayerPlan], nn.Module]
# (model, adapter config, context) -> called with the TrainState after every optimiser step
HookFn = Callable[[nn.Module, AdapterConfig, HookContext], Callable[[Any], None]]


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    config_cls: type[AdapterConfig]
    wrap: WrapFn | None  # None: no module is replaced (full fine-tuning, frozen base)
    trains_base: bool = False
    make_hook: HookFn | None = None  # e.g. ALoRA's rank reallocation
    report: Callable[[nn.Module], dict] | None = None  # extra entries for results.json
    # defined on roles (IA3, MoV): a fused linear targeted by role is adapted on those roles' columns
    # only; otherwise (LoRA-type experts) the adapter acts on the whole fused output, as peft does
    slices_fused: bool = False


ADAPTERS: Registry[AdapterSpec] = Registry("adapter", "adapter")


def register_adapter(
    name: str, config_cls: type[AdapterConfig], *, trains_base: bool = False, make_hook: HookFn | None = None,
    report: Callable[[nn.Module], dict] | None = None, slices_fused: bool = False,
):
    """Decorator for a variant's wrap function: registers it and stores its config schema as
    ``schema/adapter/<name>`` (the schema of ``conf/adapter/<name>.yaml``)."""

    def deco(wrap: WrapFn | None) -> WrapFn | None:
        ADAPTERS.register(name, AdapterSpec(name, config_cls, wrap, trains_base, make_hook, report, slices_fused))
        ConfigStore.instance().store(group="schema/adapter", name=name, node=config_cls)
        return wrap

    return deco
