"""Every data kind a run can use: one module per kind in this package, each registering one
:class:`moe_lora.data.kinds.DataKind` (or two related ones) at import.

Importing this package imports every module in it (like ``moe_lora.adapters.variants``), so
``validate`` and the runner read one complete registry and a new kind is one file here. The kinds
sit above the layers they draw on (``data``, ``world``, ``eval``), which never import a kind.
"""

from __future__ import annotations

import importlib
import pkgutil

from moe_lora.data.kinds import DATA_KINDS, DataEnv, DataKind, ModelChecks, kind_of, register_kind

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DATA_KINDS", "DataEnv", "DataKind", "ModelChecks", "kind_of", "register_kind"]
