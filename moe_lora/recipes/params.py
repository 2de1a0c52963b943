"""``moe-lora params``: the targets table and the parameter table of a config, on the meta device
(no weights are allocated, nothing downloads; a checkpoint's own config.json is read when there is
one)."""

from __future__ import annotations

from moe_lora.adapters import ADAPTERS
from moe_lora.adapters.inject import budget_summary, count_parameters, inject_adapter, plan_targets
from moe_lora.model.layouts import resolve_layout
from moe_lora.model.structure import read_structure
from moe_lora.model.targets import format_targets, targets_summary
from moe_lora.recipes.validate import base_meta_model
from moe_lora.routing.base_router import attach_base_routers
from moe_lora.routing.router import Router


def print_params(cfg) -> None:
    model = base_meta_model(cfg)
    base_total = sum(p.numel() for p in model.parameters())
    spec, layers, budget, planned, plans = ADAPTERS.get(cfg.adapter.name), {}, None, None, None
    if spec.wrap is not None:
        structure, sites = planned = plan_targets(model, cfg.adapter, cfg.model)
        plans = resolve_layout(cfg.layout, cfg.adapter, structure.num_layers)  # once: budget and injection
        print(format_targets(targets_summary(structure, sites, spec.slices_fused)) + "\n")
        layers = {site.name.rpartition(".")[0] if site.expert else site.name: site.layer for site in sites}
        if hasattr(cfg.adapter, "num_experts"):
            budget = budget_summary(cfg.adapter, cfg.layout, planned, plans)
    blocks = (planned[0] if planned else read_structure(model, cfg.model.modules)).moe  # before experts are wrapped
    names = inject_adapter(model, cfg.adapter, cfg.model, cfg.layout, planned=planned, plans=plans)
    base_routers = attach_base_routers(model, cfg.model.moe, None, blocks)  # model.moe: null experts, training
    counts = count_parameters(model)
    if names:
        print(f"{'module':<44} {'layer':>5} {'experts':>7} {'rank':>5} {'top_k':>5} {'trainable':>12}")
    for name in names:
        mod = model.get_submodule(name)
        routers = [m for m in mod.modules() if isinstance(m, Router)]
        experts = routers[0].num_experts if routers else getattr(mod, "num_experts", 1)
        k = routers[0].top_k if routers else None
        n = sum(p.numel() for p in mod.parameters() if p.requires_grad)
        print(f"{name:<44} {layers.get(name)!s:>5} {experts:>7} {getattr(mod, 'rank', '-')!s:>5} {k!s:>5} {n:>12,}")
    t, r = counts["trainable"], counts["routers"]
    print(
        f"\nmodel {cfg.model.name}: {base_total:,} base parameters; adapter {cfg.adapter.name}, layout {cfg.layout.name}"
    )
    print(
        f"trainable: {t:,} ({100 * t / base_total:.4f}% of base) | without routers: {t - r:,} "
        f"({100 * (t - r) / base_total:.4f}%) | routers: {r:,} | total: {counts['total']:,}"
    )
    if base_routers:
        print(base_router_line(model, cfg.model.moe, base_routers))
    if budget is not None:
        per_layer = budget["experts_per_layer"]
        print(
            f"experts: {sum(per_layer)} over {len(per_layer)} layers ({experts_range(per_layer)} per layer) | "
            f"expert slots over adapted linears: {budget['expert_slots']:,}"
        )


def base_router_line(model, moe, names: list[str]) -> str:
    """The MoE base's routers: how many, their rows (null experts included), trained or frozen."""
    first = model.get_submodule(names[0])
    rows, width = first.weight.shape
    n = moe.null_experts
    nulls = f" ({rows - n} experts + {n} null, top-{first.top_k})" if n else ""
    trained = sum(model.get_submodule(n).weight.numel() for n in names) if moe.train_router else 0
    return (
        f"base routers: {len(names)} of [{rows}, {width}]{nulls}, "
        f"{'trained: ' + format(trained, ',') + ' parameters' if trained else 'frozen'}"
    )


def experts_range(per_layer: list[int]) -> str:
    """``5`` or ``5-6``: how many experts a layer gets."""
    lo, hi = min(per_layer), max(per_layer)
    return str(lo) if lo == hi else f"{lo}-{hi}"
