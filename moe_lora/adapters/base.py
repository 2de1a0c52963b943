"""The adapter registry: a variant registers its config dataclass and its layer factory once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from torch import nn

from moe_lora.config import AdapterConfig
from moe_lora.model.layouts import LayerPlan
from moe_lora.registry import Registry


@dataclass
class HookContext:
    """What a training hook may use besides the training state."""

    val_loss: Callable[[], float]  # loss on a fixed validation batch, model in eval mode
    recipe: Any
    log: Callable[[dict], None]


# (base linear, adapter config, plan) -> the module that replaces the base linear
WrapFn = Callable[[nn.Module, AdapterConfig, LayerPlan], nn.Module]
# (experts module, adapter config, plan, its fused tensors to adapt, its path) -> its replacement
ExpertsWrapFn = Callable[[nn.Module, AdapterConfig, LayerPlan, list[str], str], nn.Module]
# (adapter config, model) -> the config with its model-dependent settings resolved (MoV's FFN site)
PrepareFn = Callable[[AdapterConfig, nn.Module], AdapterConfig]
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
    # the names (last segments) of the tensors the variant trains, as peft's per-method ``prefix``:
    # tests assert that nothing else trains, and the saved adapter holds exactly these
    prefixes: tuple[str, ...] = ()
    # how the variant adapts an MoE layer's fused routed experts (LoRA: moe_lora.adapters.experts);
    # None: targets that include them are refused in one line
    wrap_experts: ExpertsWrapFn | None = None
    # settings that depend on the model, resolved before anything is wrapped (MoV's ffn_route_on=auto)
    prepare: PrepareFn | None = None


ADAPTERS: Registry[AdapterSpec] = Registry("adapter", "adapter")


def register_adapter(
    name: str,
    config_cls: type[AdapterConfig],
    *,
    trains_base: bool = False,
    make_hook: HookFn | None = None,
    report: Callable[[nn.Module], dict] | None = None,
    slices_fused: bool = False,
    prefixes: tuple[str, ...] = (),
    wrap_experts: ExpertsWrapFn | None = None,
    prepare: PrepareFn | None = None,
):
    """Decorator for a variant's wrap function: registers it and stores its config schema as
    ``schema/adapter/<name>`` (the schema of ``conf/adapter/<name>.yaml``)."""

    def deco(wrap: WrapFn | None) -> WrapFn | None:
        ADAPTERS.register(
            name,
            AdapterSpec(
                name, config_cls, wrap, trains_base, make_hook, report, slices_fused, prefixes, wrap_experts, prepare
            ),
        )
        ConfigStore.instance().store(group="schema/adapter", name=name, node=config_cls)
        return wrap

    return deco
