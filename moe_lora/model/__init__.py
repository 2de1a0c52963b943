"""Base models: loading (hub, local folder, meta device), the structure reader (roles, blocks, MoE
blocks), target resolution and expert layouts per layer. Knows no adapters, routing or training."""
