"""Full fine-tuning: every base weight trains; no module is replaced (a reference row)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from moe_lora.adapters.base import register_adapter
from moe_lora.config import AdapterConfig


@dataclass
class FullConfig(AdapterConfig):
    name: str = "full"
    target_modules: List[str] = field(default_factory=lambda: ["all"])  # unused: everything trains


register_adapter("full", FullConfig, trains_base=True)(None)
