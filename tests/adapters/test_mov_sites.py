"""MoV's site rule: per head only on the query, key and value outputs; one router over the whole
vector elsewhere (the FFN's gate and up outputs, the attention output), whatever the widths."""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moe_lora.adapters.inject import inject_adapter
from moe_lora.adapters.variants.mov import MoVConfig, MoVLinear
from moe_lora.config import LayoutConfig
from tests.adapters.test_lora_peft import MODEL_CFG

FFN = 44  # not a multiple of the head size 8: routing FFN outputs per head could not even build


def llama_with_odd_ffn() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


def test_mov_routes_per_head_only_where_heads_exist() -> None:
    model = llama_with_odd_ffn()
    model_cfg = replace(MODEL_CFG, intermediate_size=FFN, num_kv_heads=2)
    names = inject_adapter(model, MoVConfig(num_experts=3, target_modules=["all"]), model_cfg, LayoutConfig())
    widths = {n.rsplit(".", 1)[-1]: model.get_submodule(n).router.weight.shape for n in names}
    head = 32 // 4
    assert widths == {
        "q_proj": (3, head),
        "k_proj": (3, head),
        "v_proj": (3, head),
        "o_proj": (3, 32),  # the residual stream: no heads
        "gate_proj": (3, FFN),
        "up_proj": (3, FFN),
        "down_proj": (3, FFN),  # its input, as before
    }
    up: MoVLinear = model.get_submodule(next(n for n in names if n.endswith("up_proj")))
    seen = []
    up.router.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        up.ia3_v[1].fill_(2.0)
        out = up(x)
        h = up.base(x)
        assert torch.equal(seen[0], h.unsqueeze(-2))  # the whole vector as one group, one router
        assert torch.allclose(out, h * (1 + up.router(h)[..., 1:2]), atol=1e-6)
    ids = torch.randint(0, 50, (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()  # the whole model trains
