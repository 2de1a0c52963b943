"""The adapter registry: a variant registers its config dataclass and its layer factory once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from torch import nn

from moe_lora.config import AdapterConfig
from moe_lora.registry import Registry


@dataclass(frozen=True)
class LayerPlan:
    """What one adapted linear gets, after the layout is resolved for its layer."""

    layer: int | None
    num_experts: int
    rank: int
    top_k: int | None


# (base linear, adapter config, plan) -> the module that replaces the base linear
WrapFn = Callable[[nn.Module, AdapterConfig, LayerPlan], nn.Module]


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    config_cls: type[AdapterConfig]
    wrap: WrapFn | None  # None: no module is replaced (full fine-tuning, frozen base)
    trains_base: bool = False


ADAPTERS: Registry[AdapterSpec] = Registry("adapter", "adapter")


def register_adapter(name: str, config_cls: type[AdapterConfig], *, trains_base: bool = False):
    """Decorator for a variant's wrap function: registers it and stores its config schema as
    ``schema/adapter/<name>`` (the schema of ``conf/adapter/<name>.yaml``)."""

    def deco(wrap: WrapFn | None) -> WrapFn | None:
        ADAPTERS.register(name, AdapterSpec(name, config_cls, wrap, trains_base))
        ConfigStore.instance().store(group="schema/adapter", name=name, node=config_cls)
        return wrap

    return deco
