"""Adapters: where they go (injection) is separate from what they compute (one file per variant).

Importing this package imports every variant module in it, which registers the variant and its
config schema; a new variant is one Python file here plus one YAML file in ``conf/adapter/``.
"""

from __future__ import annotations

import importlib
import pkgutil

from moe_lora.adapters.base import ADAPTERS, AdapterSpec, register_adapter

_INFRA = {"base", "layer", "inject", "slices"}

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _INFRA:
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["ADAPTERS", "AdapterSpec", "register_adapter"]
