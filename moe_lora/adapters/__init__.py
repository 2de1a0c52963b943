"""Adapters: where they go (injection) is separate from what they compute (one file per variant).

Importing this package imports every variant module in it, which registers the variant and its
config schema; a new variant is one Python file in ``variants/`` plus one YAML file in
``conf/adapter/``. The infrastructure (base, layer, inject, csr, slices, merging) lives beside it and
is never imported as a variant.
"""

from __future__ import annotations

import importlib
import pkgutil

from moe_lora.adapters import variants
from moe_lora.adapters.base import ADAPTERS, AdapterSpec, register_adapter

for _mod in pkgutil.iter_modules(variants.__path__):
    importlib.import_module(f"{variants.__name__}.{_mod.name}")

__all__ = ["ADAPTERS", "AdapterSpec", "register_adapter"]
