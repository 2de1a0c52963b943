"""Where adapters go: ask the model's structure which linears the targets select, wrap them in place.

Targets are roles (``query``, ``key``, ``value``, ``output``, ``ffn_in``, ``ffn_gate``, ``ffn_up``,
``ffn_out``), blocks (``attention``, ``ffn``, ``all``) or module names (matched as a suffix of the
dotted path, so ``mlp.c_proj`` tells GPT-2's two ``c_proj`` apart). Roles and blocks come from
:mod:`moe_lora.model.structure` (detected from the model, or ``model.modules``); every role or block a
target names must exist in every layer, and a module name must match in every layer it matches in
any, so a setting never adapts silently less than it says. The rule for fused projections: a
variant defined on roles (IA3, MoV) adapts only the targeted roles' columns of a fused linear; any
other variant acts on the whole fused output, as peft does when it targets ``c_attn``. The base
model is frozen; no modelling code is touched.

Fused routed experts (an MoE layer's ``experts.gate_up_proj`` / ``down_proj``) are sites of their
own: a variant registered with ``wrap_experts`` (LoRA: :mod:`moe_lora.adapters.experts`) replaces
each experts module once, adapting the tensors the targets select in it; any other variant refuses
them in one line before anything is built.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from moe_lora.adapters.base import ADAPTERS, AdapterSpec, LayerPlan
from moe_lora.adapters.experts import check_interface
from moe_lora.config import AdapterConfig, LayoutConfig, ModelConfig
from moe_lora.errors import ConfigError
from moe_lora.model.layouts import has_budget, is_per_layer, resolve_layout
from moe_lora.model.structure import CROSS_ATTENTION, Structure, is_adaptable, is_encoder_decoder, read_structure
from moe_lora.model.targets import Site, refuse_expert_tensors, resolve_targets, targets_summary
from moe_lora.routing.recorder import AuxLossConfig, RoutingRecorder
from moe_lora.routing.router import Router

log = logging.getLogger(__name__)
__all__ = ["count_parameters", "inject_adapter", "is_adaptable", "plan_targets"]


Planned = tuple[Structure, list[Site]]  # a model's structure and the sites the targets select in it


def plan_targets(model: nn.Module, adapter: AdapterConfig, model_cfg: ModelConfig) -> tuple[Structure, list[Site]]:
    """The model's structure and the sites ``adapter.target_modules`` selects in it (no change to
    the model). Raises ``ConfigError`` naming the entry, the family and the linears that exist."""
    structure = read_structure(model, model_cfg.modules)
    sites = resolve_targets(structure, model, list(adapter.target_modules))
    spec = ADAPTERS.get(adapter.name)
    if spec.wrap is not None and spec.wrap_experts is None:
        refuse_expert_tensors(structure, sites, adapter.name, f"adapter.target_modules={list(adapter.target_modules)}")
    if spec.wrap_experts is not None:
        for path in dict.fromkeys(s.name.rpartition(".")[0] for s in sites if s.expert is not None):
            check_interface(model.get_submodule(path), path)
        half = next((s for s in sites if s.expert and set(s.entries) in ({"ffn_gate"}, {"ffn_up"})), None)
        if spec.slices_fused and half is not None and half.expert.role == "expert_gate_up":
            raise ConfigError(
                f"adapter={adapter.name} would scale the whole fused {half.expert.describe()} (gate and up) for "
                f"{half.entries[0]!r}: target ffn_in, expert_gate_up or experts to scale it whole"
            )
    for site in sites:
        if site.partial and spec.slices_fused and site.fused is None:
            raise ConfigError(
                f"adapter={adapter.name} scales the {'+'.join(site.targeted or ())} columns of the fused "
                f"linear {site.name} ({structure.family}), whose column layout moe_lora does not know "
                f"(structure.FUSED_QKV): target it whole by name in adapter.target_modules"
            )
    return structure, sites


def targets_table(
    model: nn.Module, adapter: AdapterConfig, model_cfg: ModelConfig, planned: Planned | None = None
) -> dict[str, Any]:
    """What ``plan_targets`` selects, as results.json's ``targets`` (role -> modules -> per layer)."""
    structure, sites = planned or plan_targets(model, adapter, model_cfg)
    return targets_summary(structure, sites, ADAPTERS.get(adapter.name).slices_fused)


def aux_config(cfg: AdapterConfig) -> AuxLossConfig:
    """The shared auxiliary losses a variant switches on: its config states them
    (:meth:`RoutedConfig.aux_losses`, extended by LoRAMoE's LBC); unrouted variants have none."""
    return AuxLossConfig(**cfg.aux_losses()) if hasattr(cfg, "aux_losses") else AuxLossConfig()


def layer_plan(name: str, layer: int | None, plans: list[LayerPlan], layout: LayoutConfig) -> LayerPlan:
    """The plan of the layer a module sits in. A module outside the decoder layers (an ``lm_head``
    target) gets the adapter's own settings, unless the layout differs per layer: then there is no
    right answer, and guessing one would be silent."""
    if layer is not None and layer < len(plans):
        return plans[layer]
    if is_per_layer(layout):
        where = "has no layer index (it is outside the decoder layers)" if layer is None else f"is in layer {layer}"
        raise ConfigError(
            f"layout={layout.name!r} sets experts/rank/top_k per layer, but target module {name!r} {where} "
            f"of a model with {len(plans)} layers (adapter.target_modules)"
        )
    return replace(plans[0], layer=None)


def budget_summary(
    adapter: AdapterConfig, layout: LayoutConfig, planned: Planned, plans: list[LayerPlan] | None = None
) -> dict[str, Any]:
    """What the layout spends (results.json ``budget``; the report's fairness columns): experts
    per layer, expert slots (experts summed over adapted linears) and active expert-rank (sum of
    top_k x rank, every expert for soft routing, over adapted linears). ``plans``: the layout as
    resolved for the injection (resolved here when not given)."""
    structure, sites = planned
    plans = plans or resolve_layout(layout, adapter, structure.num_layers)
    slots = active = 0
    for site in sites:
        plan = layer_plan(site.name, site.layer, plans, layout)
        slots += plan.num_experts
        active += (plan.top_k or plan.num_experts) * plan.rank
    return {"experts_per_layer": [p.num_experts for p in plans], "expert_slots": slots, "active_expert_rank": active}


def inject_adapter(
    model: nn.Module,
    adapter: AdapterConfig,
    model_cfg: ModelConfig,
    layout: LayoutConfig,
    recorder: RoutingRecorder | None = None,
    planned: Planned | None = None,
    plans: list[LayerPlan] | None = None,
) -> list[str]:
    """Freeze the base, wrap every target linear, attach routers to the recorder; ``planned``: what
    ``plan_targets`` returned for this model (read once for the targets table and the injection);
    ``plans``: the layout resolved once for the budget summary and the injection.

    Returns the names of the adapted modules (an MoE layer's experts module for its fused tensors).
    """
    spec = ADAPTERS.get(adapter.name)
    for p in model.parameters():
        p.requires_grad_(spec.trains_base)
    if spec.wrap is None:
        return []
    structure, sites = planned or plan_targets(model, adapter, model_cfg)
    plans = plans or resolve_layout(layout, adapter, structure.num_layers)
    if (layout.experts is not None or layout.budget_first or has_budget(layout)) and hasattr(adapter, "num_experts"):
        spends = layout.experts is None and not has_budget(layout)  # every layout's default budget
        log.info(
            "layout=%s sets experts per layer %s; adapter.num_experts=%s %s",
            layout.name,
            [p.num_experts for p in plans],
            adapter.num_experts,
            "per layer on average (the default budget)" if spends else "is not used",
        )
    dtype = getattr(torch, adapter.dtype)
    adapter = spec.prepare(adapter, model) if spec.prepare else adapter
    experts: dict[str, list[Site]] = {}  # experts module -> its fused tensors to adapt
    for site in sites:
        if site.expert is not None:
            experts.setdefault(site.name.rpartition(".")[0], []).append(site)
            continue
        plan = replace(
            layer_plan(site.name, site.layer, plans, layout), head_dim=structure.head_dim, dtype=dtype, site=site
        )
        parent_name, _, child = site.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = spec.wrap(getattr(parent, child), adapter, plan).train(model.training)
        setattr(parent, child, wrapped)
        if hasattr(wrapped, "on_inject"):  # a wrapper that reads a sibling module (MoV on the FFN activation)
            wrapped.on_inject(parent, site.name)
    for path, tensors in experts.items():
        plan = replace(layer_plan(path, tensors[0].layer, plans, layout), dtype=dtype)
        parent_name, _, child = path.rpartition(".")
        projections = [s.name.rpartition(".")[2] for s in tensors]
        wrapped = spec.wrap_experts(model.get_submodule(path), adapter, plan, projections, path)
        setattr(model.get_submodule(parent_name), child, wrapped.train(model.training))
    check_prefixes(model, spec)
    if recorder is not None:
        attach_routers(model, structure, sites, aux_config(adapter), recorder)
    # module names: an experts module once for its fused tensors
    return list(dict.fromkeys(s.name.rpartition(".")[0] if s.expert else s.name for s in sites))


def check_prefixes(model: nn.Module, spec: AdapterSpec) -> None:
    """What a variant trains is exactly what it declares (``register_adapter(prefixes=...)``): the
    saved adapter (every trainable tensor) then holds those tensors and nothing else."""
    if spec.trains_base:
        return
    stray = [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith(spec.prefixes)]
    if stray:
        raise RuntimeError(f"adapter={spec.name} trains {stray[:3]}, outside its declared prefixes {spec.prefixes}")


def attach_routers(
    model: nn.Module, structure: Structure, sites: list[Site], aux: AuxLossConfig, recorder: RoutingRecorder
) -> None:
    """Every router reports to the recorder under its site's name, on its token stream."""
    seq2seq = is_encoder_decoder(model)
    for name, mod in model.named_modules():
        if isinstance(mod, Router):
            site = max((s for s in sites if name.startswith(f"{s.name}.")), key=lambda s: len(s.name), default=None)
            stream = token_stream(structure, site) if seq2seq and site is not None else "input"
            recorder.attach(mod, name.removesuffix(".router"), aux, stream)


def token_stream(structure: Structure, site: Site) -> str:
    """Which tokens a router of an encoder-decoder sees: the encoder's (its stack, and the keys and
    values of cross-attention, read from the encoder's output) or the decoder's (``target``). The
    recorder checks the shapes, so a misread model fails instead of masking with the wrong mask."""
    encoder = structure.stacks[0][0]
    if site.name.startswith(f"{encoder}."):
        return "input"
    cross = any(part in CROSS_ATTENTION for part in site.name.split("."))
    return "input" if cross and set(site.roles) & {"key", "value"} else "target"


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters, and trainable router parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    routers = sum(
        p.numel() for m in model.modules() if isinstance(m, Router) for p in m.parameters() if p.requires_grad
    )
    return {"trainable": trainable, "total": total, "routers": routers}
