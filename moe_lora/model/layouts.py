"""Expert layouts: how many experts (and which rank / top_k) each layer gets.

A layout is data (PEFT's ``rank_pattern`` idea), never a comma-joined string: a list of length L
(one entry per layer) or G (one per group of layers; layer l is in group floor(l * G / L)), or a
budget-first layout: a depth profile (or weights) projected exactly onto an expert budget
(:func:`project`), so the same shape works for 4, 22 or 32 layers.

One default budget for every layout, so that layouts compare at equal cost unless told otherwise:
the adapter's ``num_experts`` per layer (``num_experts`` x L experts), which is what uniform
spends. ``layout=triangle adapter=mola`` and ``layout=uniform adapter=mola`` therefore hold the
same expert slots; ``adapter.num_experts=5`` gives MoLA's 160 experts over 32 layers. A budget
(``layout.budget.total`` or ``per_layer_mean``) replaces the default for every layout, uniform
included, which then spends it exactly too (:func:`even_experts`): as evenly as integers allow,
the remainder spread over the depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_lora.config import PROFILES, AdapterConfig, LayoutConfig
from moe_lora.errors import ConfigError
from moe_lora.model.targets import Site


@dataclass(frozen=True)
class LayerPlan:
    """What one adapted linear gets, after the layout is resolved for its layer."""

    layer: int | None
    num_experts: int
    rank: int
    top_k: int | None
    head_dim: int = 0  # the model's head size (config.json's head_dim, else hidden // heads), for MoV
    dtype: torch.dtype = torch.float32  # adapter weights, routers and buffers (adapter.dtype)
    site: Site | None = None  # the linear's roles and fused layout (moe_lora.model.structure)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _per_layer(values: list[int] | None, default: int | None, num_layers: int, key: str) -> list[int | None]:
    """One value per layer. A list of G < L entries means G equal groups of layers, so G must
    divide L: with 3 entries over 4 layers, groups of 2, 1 and 1 layers are rarely what was meant."""
    if values is None:
        return [default] * num_layers
    n = len(values)
    if n > num_layers or num_layers % n:
        raise ConfigError(
            f"{key}={list(values)} has {n} entries but the model has {num_layers} layers: give one "
            f"entry per layer, or one per group of equal size ({'/'.join(map(str, divisors(num_layers)))} "
            "entries)"
        )
    return [values[layer * n // num_layers] for layer in range(num_layers)]


def _check_fields(layout: LayoutConfig, adapter: AdapterConfig) -> None:
    """A per-layer list for a field the adapter does not have would be ignored: refuse it."""
    for key, field in (("experts", "num_experts"), ("rank", "rank"), ("top_k", "top_k")):
        if getattr(layout, key) is not None and not hasattr(adapter, field):
            raise ConfigError(
                f"layout.{key} (layout={layout.name!r}) sets {key} per layer, but adapter={adapter.name!r} "
                f"has no {field}"
            )


def unit_positions(units: int) -> list[float]:
    """Centres of ``units`` equal bins of [-1, 1] (groups or layers, bottom to top)."""
    return [-1.0 + (2 * u + 1) / units for u in range(units)]


def profile_weights(shape: str | tuple[float, float], units: int) -> list[float]:
    """w(x) = 1 + a x + b (x^2 - mean x^2) at the unit positions, negatives clipped to 0; ``shape``
    is a name of ``config.PROFILES`` or (a, b)."""
    a, b = PROFILES[shape] if isinstance(shape, str) else shape
    xs = unit_positions(units)
    mean_sq = sum(x * x for x in xs) / units
    return [max(0.0, 1.0 + a * x + b * (x * x - mean_sq)) for x in xs]


def _water_fill(weights: list[float], budget: float, lo: int, hi: int) -> list[float]:
    """Real targets per layer, clip(level x w, lo, hi), at the water level whose sum is the budget
    (found by bisection: the sum only grows with the level). A zero weight sits at ``lo``."""
    w = weights if any(x > 0 for x in weights) else [1.0] * len(weights)

    def filled(level: float) -> list[float]:
        return [min(float(hi), max(float(lo), level * x)) for x in w]

    low, high = 0.0, hi / min(x for x in w if x > 0)
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if sum(filled(mid)) < budget else (low, mid)
    return filled(high)


def project(weights: list[float], total: int, lo: int, hi: int, key: str = "layout") -> list[int]:
    """Integer experts per layer from one weight per layer, within [lo, hi], summing to exactly
    ``total``: water-filled real targets, floored, and the remainder handed out one expert at a
    time by largest fractional part (earlier layers win ties)."""
    n = len(weights)
    if not lo * n <= total <= hi * n:
        raise ConfigError(f"{key}: a budget of {total} experts cannot be spread over {n} layers within [{lo}, {hi}]")
    real = _water_fill(list(weights), float(total), lo, hi)
    counts = [min(hi, int(t + 1e-9)) for t in real]
    order = sorted(range(n), key=lambda i: (-(real[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    assert sum(counts) == total and all(lo <= c <= hi for c in counts), (counts, total)
    return counts


def layer_weights(layout: LayoutConfig, num_layers: int) -> list[float]:
    """One weight per layer: ``layout.weights`` (per layer, or per group: layer l in group
    floor(l * G / L)) or the named profile at the layers' positions, or at their group's
    (``granularity: group``, ``layout.groups`` groups, uneven when they do not divide L)."""
    if layout.weights is not None:
        w = list(layout.weights)
        if len(w) > num_layers:
            raise ConfigError(f"layout.weights has {len(w)} entries but the model has {num_layers} layers")
        return [w[layer * len(w) // num_layers] for layer in range(num_layers)]
    units = min(layout.groups, num_layers) if layout.granularity == "group" else num_layers
    w = profile_weights(layout.shape, units)
    return [w[layer * units // num_layers] for layer in range(num_layers)]


def budget_total(layout: LayoutConfig, adapter: AdapterConfig, num_layers: int) -> int:
    """The experts a layout spends: ``layout.budget``, else every layout's default, the adapter's
    ``num_experts`` per layer (what uniform spends)."""
    b = layout.budget
    if b.unit == "expert_rank" and layout.rank is not None and len(set(layout.rank)) > 1:
        raise ConfigError(
            "layout.budget.unit=expert_rank with a per-layer layout.rank is not supported: the "
            "projection counts experts; give one rank for every layer"
        )
    scale = getattr(adapter, "rank", 1) if b.unit == "expert_rank" else 1
    if b.total is not None:
        if b.total % scale:
            raise ConfigError(f"layout.budget.total={b.total} expert-rank is not a multiple of adapter.rank={scale}")
        return b.total // scale
    if b.per_layer_mean is not None:
        total = b.per_layer_mean * num_layers / scale
        if abs(total - round(total)) > 1e-9:
            raise ConfigError(
                f"layout.budget.per_layer_mean={b.per_layer_mean} over {num_layers} layers is {total:g} experts, "
                "not a whole number: give layout.budget.total"
            )
        return round(total)
    return getattr(adapter, "num_experts", 1) * num_layers


def has_budget(layout: LayoutConfig) -> bool:
    """Whether ``layout.budget`` names a spend (``total`` or ``per_layer_mean``)."""
    return layout.budget.total is not None or layout.budget.per_layer_mean is not None


def _fewest_experts(layout: LayoutConfig, adapter: AdapterConfig, what: str) -> int:
    """The fewest experts a layer may get (``layout.min_experts``, else enough for top-k); refuses
    an adapter without experts, whose budget would be ignored."""
    if not hasattr(adapter, "num_experts"):
        raise ConfigError(f"{what} set experts per layer, but adapter={adapter.name!r} has no num_experts")
    top_k = getattr(adapter, "top_k", None) or 1  # top-k over real and null experts: the real ones may be fewer
    return layout.min_experts or max(1, top_k - getattr(adapter, "num_null_experts", 0))


def budget_experts(layout: LayoutConfig, adapter: AdapterConfig, num_layers: int) -> list[int]:
    """Experts per layer of a budget-first layout."""
    lo = _fewest_experts(layout, adapter, "layout.profile / layout.weights")
    total = budget_total(layout, adapter, num_layers)
    hi = layout.max_experts or total
    return project(layer_weights(layout, num_layers), total, lo, hi, f"layout={layout.name!r}")


def even_experts(total: int, num_layers: int) -> list[int]:
    """``total`` experts over the layers as evenly as integers allow: ``total // L`` on every layer
    and one more on ``r = total % L`` layers spread over the depth (the j-th at layer
    ``floor((j + 1/2) L / r)``), so no end of the stack is favoured: 113 over 22 layers is 6 on
    layers 3, 11 and 18 and 5 on the other 19; 113 over 28 is 5 on layer 14 and 4 elsewhere."""
    base, extra = divmod(total, num_layers)
    more = {int((j + 0.5) * num_layers / extra) for j in range(extra)}
    return [base + (layer in more) for layer in range(num_layers)]


def uniform_budget_experts(layout: LayoutConfig, adapter: AdapterConfig, num_layers: int) -> list[int]:
    """Experts per layer of a uniform layout given a budget: exactly the budget, evenly
    (:func:`even_experts`), or refused in one line where a layer would fall outside
    [``min_experts`` (else top-k), ``max_experts``]."""
    lo = _fewest_experts(layout, adapter, "layout.budget.total / per_layer_mean")
    total = budget_total(layout, adapter, num_layers)
    counts = even_experts(total, num_layers)
    hi = layout.max_experts or total
    if min(counts) < lo or max(counts) > hi:
        raise ConfigError(
            f"layout={layout.name!r}: a budget of {total} experts over {num_layers} layers gives "
            f"{min(counts)} to {max(counts)} per layer, outside [{lo}, {hi}] (layout.min_experts / "
            "max_experts, or the adapter's top_k)"
        )
    return counts


def resolve_layout(layout: LayoutConfig, adapter: AdapterConfig, num_layers: int) -> list[LayerPlan]:
    """One :class:`LayerPlan` per layer; raises ``ConfigError`` naming the key on a misfit."""
    _check_fields(layout, adapter)
    if layout.budget_first:
        experts: list[int | None] = list(budget_experts(layout, adapter, num_layers))
    elif has_budget(layout):
        if layout.experts is not None:
            raise ConfigError(
                f"layout.experts={list(layout.experts)} lists every layer's experts, so layout.budget "
                "would be ignored: give one or the other (layout.budget.total=null layout.budget.per_layer_mean=null)"
            )
        experts = list(uniform_budget_experts(layout, adapter, num_layers))
    else:
        experts = _per_layer(layout.experts, getattr(adapter, "num_experts", 1), num_layers, "layout.experts")
    ranks = _per_layer(layout.rank, getattr(adapter, "rank", 0), num_layers, "layout.rank")
    top_ks = _per_layer(layout.top_k, getattr(adapter, "top_k", None), num_layers, "layout.top_k")
    null = getattr(adapter, "num_null_experts", 0)
    plans = []
    for layer, (e, r, k) in enumerate(zip(experts, ranks, top_ks, strict=True)):
        if k is not None and k > e + null:
            key = "layout.top_k" if layout.top_k is not None else "adapter.top_k"
            raise ConfigError(f"{key}={k} exceeds the {e} experts of layer {layer} (layout={layout.name!r})")
        plans.append(LayerPlan(layer, e, r, k))
    return plans


def is_per_layer(layout: LayoutConfig) -> bool:
    """Whether the layout gives layers different plans (else every layer gets the adapter's own)."""
    return (
        layout.budget_first
        or has_budget(layout)
        or any(v is not None for v in (layout.experts, layout.rank, layout.top_k))
    )
