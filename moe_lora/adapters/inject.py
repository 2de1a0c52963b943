"""Where adapters go: find target linears by module-name pattern and replace them in place.

Targets are module names (matched as a suffix of the dotted path, so ``mlp.c_proj`` tells GPT-2's
two ``c_proj`` apart) or group names of ``model.modules`` (``attention``, ``ffn``, ``all``). The
base model is frozen; no modelling code is touched.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace

import torch
from torch import nn

from moe_lora.adapters.base import ADAPTERS, LayerPlan
from moe_lora.config import AdapterConfig, LayoutConfig, ModelConfig
from moe_lora.errors import ConfigError
from moe_lora.layouts import is_per_layer, resolve_layout
from moe_lora.routing.recorder import AuxLossConfig, RoutingRecorder
from moe_lora.routing.router import Router

_LAYER = re.compile(r"\.(\d+)\.")
log = logging.getLogger(__name__)


def expand_targets(targets: list[str], groups: dict[str, list[str]]) -> list[str]:
    """Replace group names (and ``all``) by the module names that ``model.modules`` lists.

    Besides the blocks ``attention`` and ``ffn``, ``model.modules`` names roles (``query``, ``key``,
    ``value``, ``output``, ``ffn_out``), so that a variant's default targets fit every family. The
    rule for fused projections: a role that a family computes inside one fused linear maps to that
    linear (GPT-2's ``query``, ``key`` and ``value`` are all ``attn.c_attn``), and the adapter then acts
    on the whole fused output, as peft does when it targets ``c_attn``."""
    out: list[str] = []
    for t in targets:
        if t == "all":
            out += [n for names in groups.values() for n in names]
        else:
            out += groups.get(t, [t])
    return list(dict.fromkeys(out))


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def name_matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    return [name for name, mod in model.named_modules() if is_adaptable(mod) and name_matches(name, patterns)]


def module_group(name: str, groups: dict[str, list[str]]) -> str | None:
    """The block a linear belongs to: ``attention`` or ``ffn`` first; role groups (``query``,
    ``ffn_out``, ...) only name subsets of those two."""
    ordered = [g for g in ("attention", "ffn") if g in groups] + [g for g in groups if g not in ("attention", "ffn")]
    return next((g for g in ordered if name_matches(name, groups[g])), None)


def aux_config(cfg: AdapterConfig) -> AuxLossConfig:
    """The shared auxiliary losses a variant switches on through its config fields."""
    return AuxLossConfig(
        lbc_beta=getattr(cfg, "lbc_beta", 0.0), lbc_delta=getattr(cfg, "lbc_delta", 0.0),
        lb_weight=getattr(cfg, "lb_weight", 0.0), z_loss_weight=getattr(cfg, "z_loss_weight", 0.0),
        lbc_mask_padding=getattr(cfg, "lbc_mask_padding", True), aux_mask_padding=getattr(cfg, "aux_mask_padding", True),
        aux_scope=getattr(cfg, "aux_scope", "local"),
    )


def layer_plan(name: str, plans: list[LayerPlan], layout: LayoutConfig) -> LayerPlan:
    """The plan of the layer a module sits in. A module outside the numbered decoder layers (an
    ``lm_head`` target) gets the adapter's own settings, unless the layout differs per layer: then
    there is no right answer, and guessing one would be silent."""
    layer = layer_index(name)
    if layer is not None and layer < len(plans):
        return plans[layer]
    if is_per_layer(layout):
        where = "has no layer index ('.<n>.' in its name)" if layer is None else f"is in layer {layer}"
        raise ConfigError(f"layout={layout.name!r} sets experts/rank/top_k per layer, but target module {name!r} {where} "
                          f"of a model with {len(plans)} layers (adapter.target_modules)")
    return replace(plans[0], layer=None)


def inject_adapter(
    model: nn.Module, adapter: AdapterConfig, model_cfg: ModelConfig, layout: LayoutConfig,
    recorder: RoutingRecorder | None = None,
) -> list[str]:
    """Freeze the base, wrap every target linear, attach routers to the recorder.

    Returns the names of the adapted modules.
    """
    spec = ADAPTERS.get(adapter.name)
    for p in model.parameters():
        p.requires_grad_(spec.trains_base)
    if spec.wrap is None:
        return []
    patterns = expand_targets(adapter.target_modules, model_cfg.modules)
    names = find_targets(model, patterns)
    if not names:
        linears = [n for n, m in model.named_modules() if is_adaptable(m)][:4]
        raise ConfigError(f"adapter.target_modules={adapter.target_modules} matched no linear module of "
                          f"model={model_cfg.name!r} (its linears look like: {', '.join(linears)})")
    plans = resolve_layout(layout, adapter, model_cfg.num_layers)
    if layout.experts is not None and hasattr(adapter, "num_experts"):
        log.info("layout=%s sets experts per layer %s; adapter.num_experts=%s is not used", layout.name,
                 [p.num_experts for p in plans], adapter.num_experts)
    head_dim = model_cfg.head_dim or model_cfg.hidden_size // model_cfg.num_heads
    dtype = getattr(torch, adapter.dtype)
    for name in names:
        plan = replace(layer_plan(name, plans, layout), group=module_group(name, model_cfg.modules), head_dim=head_dim,
                       dtype=dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, spec.wrap(getattr(parent, child), adapter, plan).train(model.training))
    if recorder is not None:
        aux = aux_config(adapter)
        for name, mod in model.named_modules():
            if isinstance(mod, Router):
                recorder.attach(mod, name.removesuffix(".router"), aux)
    return names


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters, and trainable router parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    routers = sum(p.numel() for m in model.modules() if isinstance(m, Router) for p in m.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "routers": routers}
