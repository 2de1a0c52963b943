"""Expert layouts: how many experts (and which rank / top_k) each layer gets.

A layout is data (PEFT's ``rank_pattern`` idea), never a comma-joined string: a list of length L
(one entry per layer) or G (one per group of layers; layer l is in group floor(l * G / L)).
"""

from __future__ import annotations

from moe_lora.adapters.base import LayerPlan
from moe_lora.config import AdapterConfig, LayoutConfig
from moe_lora.errors import ConfigError


def _per_layer(values: list[int] | None, default: int | None, num_layers: int, key: str) -> list[int | None]:
    if values is None:
        return [default] * num_layers
    n = len(values)
    if n > num_layers:
        raise ConfigError(f"{key}={list(values)} has {n} entries but the model has {num_layers} layers "
                          f"(give one entry per layer, or one per group of layers)")
    return [values[layer * n // num_layers] for layer in range(num_layers)]


def resolve_layout(layout: LayoutConfig, adapter: AdapterConfig, num_layers: int) -> list[LayerPlan]:
    """One :class:`LayerPlan` per layer; raises ``ConfigError`` naming the key on a misfit."""
    experts_default = getattr(adapter, "num_experts", 1)
    experts = _per_layer(layout.experts, experts_default, num_layers, "layout.experts")
    if layout.experts is not None and not hasattr(adapter, "num_experts"):
        raise ConfigError(f"layout={layout.name!r} sets experts per layer, but adapter={adapter.name!r} has no experts")
    ranks = _per_layer(layout.rank, getattr(adapter, "rank", 0), num_layers, "layout.rank")
    top_ks = _per_layer(layout.top_k, getattr(adapter, "top_k", None), num_layers, "layout.top_k")
    null = getattr(adapter, "num_null_experts", 0)
    plans = []
    for layer, (e, r, k) in enumerate(zip(experts, ranks, top_ks, strict=False)):
        if k is not None and k > e + null:
            key = "layout.top_k" if layout.top_k is not None else "adapter.top_k"
            raise ConfigError(f"{key}={k} exceeds the {e} experts of layer {layer} (layout={layout.name!r})")
        plans.append(LayerPlan(layer, e, r, k))
    return plans
