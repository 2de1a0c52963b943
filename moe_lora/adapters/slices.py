"""Role slices of a fused linear: each targeted role's output columns get their own module.

``qkv_proj`` computes query, key and value at once. A method defined on roles (IA3 and MoV scale
the key and value activations) acts on those roles' columns only and leaves the rest of the fused
output untouched, so a fused checkpoint and its unfused twin train the same adapter. The columns
come from :class:`moe_lora.model.structure.Fused` (the family's split, e.g. per head for GPT-NeoX).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_lora.adapters.layer import WrapsLinear


class SlicedOutput(WrapsLinear):
    """``y = base(x)`` with ``y[..., cols_r] = parts[r](y[..., cols_r])`` for every role r."""

    def __init__(self, base: nn.Module, parts: dict[str, nn.Module], columns: dict[str, list[int]]) -> None:
        super().__init__()
        self.base = base
        self.parts = nn.ModuleDict(parts)
        device = base.weight.device
        for role in parts:  # not persistent: the layout is the model's, not a trained tensor
            self.register_buffer(
                f"cols_{role}", torch.tensor(columns[role], dtype=torch.long, device=device), persistent=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        cols = [getattr(self, f"cols_{role}") for role in self.parts]
        pieces = [part(out.index_select(-1, c)) for part, c in zip(self.parts.values(), cols, strict=True)]
        return out.index_copy(-1, torch.cat(cols), torch.cat(pieces, dim=-1))
