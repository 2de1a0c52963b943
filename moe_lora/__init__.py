"""moe_lora: config-driven experiments with LoRA + Mixture-of-Experts adapters.

Using a trained run (the API is imported on first use, so ``import moe_lora`` stays cheap)::

    import moe_lora

    model, tok = moe_lora.load("outputs/2026-12-06/12-00-00")  # base + adapter, eval mode
    ids = tok("Q : where was nora claes born ? A :", return_tensors="pt")
    print(tok.decode(model.generate(**ids, max_new_tokens=8)[0]))

Training moe_lora's adapters on your own model (your loop, HF ``Trainer``, TRL)::

    model = moe_lora.add_adapter(model, "loramoe", num_experts=4)
    loss = model(**batch).loss + moe_lora.aux_loss(model)  # LBC / load balance of that forward
    stats = moe_lora.routing_stats(model)  # per module: importance, load, CV, entropy ...
    model = moe_lora.merge(model)  # LoRA, ALoRA, MELoRA, IA3: folded into the base weights
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_adapter", "aux_loss", "load", "merge", "routing_stats"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moe_lora.recipes import api

        return getattr(api, name)
    raise AttributeError(f"module 'moe_lora' has no attribute {name!r}")
