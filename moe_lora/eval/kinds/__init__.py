"""Metric kinds: one file each. Importing this package imports every module in it, which registers
its kinds (``KINDS``) and the result columns they produce (``COLUMNS``); ``base`` is the contract.
Modules load in name order, and columns keep their declaration order (the report's column order)."""

from __future__ import annotations

import importlib
import pkgutil

from moe_lora.eval.kinds.base import COLUMNS, KINDS, Column, MetricKind, Scoring, SetScore, compare, summarise

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["COLUMNS", "KINDS", "Column", "MetricKind", "Scoring", "SetScore", "compare", "summarise"]
