"""Every data kind a run can use, registered by importing the module that defines it.

A kind's module builds a :class:`moe_lora.data.kinds.DataKind` and registers it at import (see
``moe_lora/data/kinds.py``); this module imports each such module once, so ``validate`` and the
runner read the same registry. A new kind is its module plus its import line here.
"""

from __future__ import annotations

from moe_lora.data import p3, sources
from moe_lora.data.kinds import DATA_KINDS, DataEnv, DataKind, ModelChecks, kind_of, register_kind
from moe_lora.recipes import facts
from moe_lora.world import mixture

KIND_MODULES = (p3, sources, mixture, facts)  # imported for their registrations

__all__ = ["DATA_KINDS", "KIND_MODULES", "DataEnv", "DataKind", "ModelChecks", "kind_of", "register_kind"]
