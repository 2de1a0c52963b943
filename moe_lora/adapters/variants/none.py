"""The frozen base model: nothing trains; the run only evaluates (a reference row)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from moe_lora.adapters.base import register_adapter
from moe_lora.config import AdapterConfig


@dataclass
class NoneConfig(AdapterConfig):
    name: str = "none"
    target_modules: List[str] = field(default_factory=lambda: ["all"])  # unused


register_adapter("none", NoneConfig)(None)
