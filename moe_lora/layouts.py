"""Expert layouts: how many experts (and which rank / top_k) each layer gets.

A layout is data (PEFT's ``rank_pattern`` idea), never a comma-joined string: a list of length L
(one entry per layer) or G (one per group of layers; layer l is in group floor(l * G / L)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_lora.config import AdapterConfig, LayoutConfig
from moe_lora.errors import ConfigError
from moe_lora.targets import Site


@dataclass(frozen=True)
class LayerPlan:
    """What one adapted linear gets, after the layout is resolved for its layer."""

    layer: int | None
    num_experts: int
    rank: int
    top_k: int | None
    head_dim: int = 0  # the model's head size (config.json's head_dim, else hidden // heads), for MoV
    dtype: torch.dtype = torch.float32  # adapter weights, routers and buffers (adapter.dtype)
    site: Site | None = None  # the linear's roles and fused layout (moe_lora.structure)


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


def resolve_layout(layout: LayoutConfig, adapter: AdapterConfig, num_layers: int) -> list[LayerPlan]:
    """One :class:`LayerPlan` per layer; raises ``ConfigError`` naming the key on a misfit."""
    _check_fields(layout, adapter)
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
    return any(v is not None for v in (layout.experts, layout.rank, layout.top_k))
