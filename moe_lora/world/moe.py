"""The built-in world's MoE base: a tiny Qwen3-MoE pretrained on the world's text, cached.

Every MoE-base feature (LoRA on the experts, the base router trained and watched, AdaMoE's null
experts in the base router) then runs offline in minutes. Its architecture is one transformers
ships (``Qwen3MoeForCausalLM``: fused ``[E, 2I, H]`` / ``[E, H, I]`` experts, a softmax top-k
router whose forward returns ``(logits, weights, indices)``, and an experts module that skips the
sentinel index ``E``), so the structure reader, the adapters and the router code treat it exactly
like a hub checkpoint of that family; nothing here is modelling code.

Sized like the dense ``tiny_world``: the same attention, and ``model.moe.num_experts`` experts of
width ``model.moe.expert_size`` with ``model.moe.top_k`` active, so that top-k x expert_size equals
the dense model's ``intermediate_size`` (8 experts of 256, top-2: the same active FFN width, 512,
and 4x its FFN parameters). The top-k weights are renormalised (``norm_topk_prob``, as the
released Qwen3-MoE and Mixtral checkpoints do). Pretraining adds the family's own load-balance
loss (transformers' ``load_balancing_loss_func`` x ``router_aux_loss_coef``, switched on by
``output_router_logits`` for the pretraining only), so the cached experts start balanced, as a
released MoE's do; the saved config turns it off again (fine-tuning adds its own, see
``model.moe.train_router``).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, Qwen3MoeConfig

from moe_lora.config import WORLD_MOE_FAMILY, ModelConfig

ARCH_FIELDS = ("num_experts", "top_k", "expert_size", "router_aux_loss_coef")


def is_world_moe(cfg: ModelConfig) -> bool:
    return cfg.source == "world" and cfg.family == WORLD_MOE_FAMILY


def moe_arch(cfg: ModelConfig) -> dict[str, Any]:
    """The MoE part of the cache key (``world.model.cache_key``): experts, top-k, widths."""
    return {f"moe_{k}": getattr(cfg.moe, k) for k in ARCH_FIELDS}


def world_moe_config(cfg: ModelConfig, vocab_size: int) -> Qwen3MoeConfig:
    """The transformers config of the toy MoE (ids as the world tokenizer's: pad 0, EOS 1). Every
    layer is sparse; the dense ``intermediate_size`` is unused by Qwen3-MoE then (kept for the
    record). ``output_router_logits`` is on: pretraining adds the family's load-balance loss."""
    heads = cfg.num_heads
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        **cfg.moe.architecture(),
        output_router_logits=True,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=cfg.num_kv_heads or heads,
        head_dim=cfg.head_dim or cfg.hidden_size // heads,
        max_position_embeddings=256,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )


def end_pretraining(model: PreTrainedModel) -> None:
    """The cached model's config no longer adds the load-balance loss by itself: fine-tuning adds
    the family's loss through the routing recorder, where it is weighted, logged and optional."""
    model.config.output_router_logits = False
