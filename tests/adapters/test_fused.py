"""Fused projections: IA3 and MoV on a fused q|k|v act on the key and value columns only.

Two kinds of evidence. (1) Phi-3 is Llama with fused ``qkv_proj`` and ``gate_up_proj``: a Phi-3 and
a Llama holding the same weights (split by hand here) give equal logits, and stay equal under IA3
and MoV with the same random vectors and routers. (2) For every family in structure.FUSED_QKV,
ground truths that do not use the column map: scaling all value columns by c equals scaling the
output projection's weight by c, and scaling all key columns by c equals scaling all query columns
by c (q.k is bilinear), while a wrong column map breaks at least one of them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Phi3Config

from moe_lora.adapters.inject import inject_adapter
from moe_lora.adapters.variants.ia3 import IA3Config
from moe_lora.adapters.variants.mov import MoVConfig
from moe_lora.config import LayoutConfig, ModelConfig
from moe_lora.model.structure import FUSED_QKV, read_structure

CFG = ModelConfig(name="t", source="world")
DIMS = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)


def twins() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    phi3 = AutoModelForCausalLM.from_config(Phi3Config(**DIMS)).eval()
    llama = LlamaForCausalLM(LlamaConfig(**DIMS, mlp_bias=False, attention_bias=False)).eval()
    q, kv, inter = 4 * 8, 2 * 8, 48
    state = {}
    for name, t in phi3.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            stem = name.removesuffix("qkv_proj.weight")
            state |= {
                f"{stem}q_proj.weight": t[:q],
                f"{stem}k_proj.weight": t[q : q + kv],
                f"{stem}v_proj.weight": t[q + kv :],
            }
        elif name.endswith("gate_up_proj.weight"):
            stem = name.removesuffix("gate_up_proj.weight")
            state |= {f"{stem}gate_proj.weight": t[:inter], f"{stem}up_proj.weight": t[inter:]}
        else:
            state[name] = t
    llama.load_state_dict(state)
    return phi3, llama


def fill(model: torch.nn.Module, seed: int) -> None:
    """Random adapter tensors, drawn by role and layer name so that the twins get the same ones."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                key = name.replace("qkv_proj.parts.key", "k_proj").replace("qkv_proj.parts.value", "v_proj")
                g = torch.Generator().manual_seed(seed + sum(map(ord, key)))
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("adapter", [IA3Config(), MoVConfig(num_experts=3)])
def test_fused_phi3_equals_its_unfused_llama_twin_under_ia3_and_mov(adapter) -> None:
    phi3, llama = twins()
    x = torch.randint(2, 64, (2, 9))
    torch.testing.assert_close(phi3(x).logits, llama(x).logits)
    inject_adapter(phi3, adapter, CFG, LayoutConfig())
    inject_adapter(llama, adapter, CFG, LayoutConfig())
    count = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (phi3, llama)]
    assert count[0] == count[1]  # the same parameters: no vector on the query columns
    fill(phi3, 1)
    fill(llama, 1)
    out = phi3(x).logits
    torch.testing.assert_close(out, llama(x).logits)
    assert not torch.allclose(out, twins()[0](x).logits, atol=1e-3)  # the adapter did act


FAMILIES = {  # model_type -> extra config fields (tiny; the variants FUSED_QKV distinguishes)
    "gpt2": {},
    "phi3": {},
    "mpt": {},
    "gpt_neox": {},
    "bloom": {},
    "persimmon": {"qk_layernorm": False},
    "codegen": {"rotary_dim": 4},
    "falcon": {"new_decoder_architecture": False, "multi_query": True},
    "falcon-per-head": {"new_decoder_architecture": False, "multi_query": False},
    "falcon-new": {"new_decoder_architecture": True, "num_kv_heads": 2},
    "gpt_bigcode": {"multi_query": True},
    "gpt_bigcode-per-head": {"multi_query": False},
}


def tiny(family: str) -> torch.nn.Module:
    model_type = family.split("-")[0]
    kw = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        max_position_embeddings=64,
    )
    if model_type in ("gpt2", "gpt_bigcode", "codegen"):
        kw |= {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}
    if model_type == "mpt":
        kw |= {"d_model": 32, "n_layers": 2, "n_heads": 4}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw | FAMILIES[family])).eval()
    with torch.no_grad():  # weights large enough that attention matters (the inits' 0.02 barely moves logits)
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model


def scaled(family: str, target: str, c: float) -> torch.Tensor:
    model = tiny(family)
    inject_adapter(model, IA3Config(target_modules=[target]), CFG, LayoutConfig())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(c)
    return model(torch.arange(2, 11).unsqueeze(0)).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_column_maps_agree_with_the_modelling_code(family) -> None:
    assert family.split("-")[0] in FUSED_QKV
    x = torch.arange(2, 11).unsqueeze(0)
    base = tiny(family)
    structure = read_structure(base)
    fused = next(li for li in structure.linears if li.fused is not None and "value" in li.roles)
    out = next(li for li in structure.linears if li.layer == fused.layer and "output" in li.roles)
    with torch.no_grad():  # ground truth: the output projection's weight times c
        for li in structure.linears:
            if "output" in li.roles:
                base.get_submodule(li.name).weight.mul_(1.5)
    assert out.block == "attention"
    torch.testing.assert_close(scaled(family, "value", 1.5), base(x).logits, rtol=1e-4, atol=1e-5)
    keys, queries = scaled(family, "key", 1.7), scaled(family, "query", 1.7)
    torch.testing.assert_close(keys, queries, rtol=1e-4, atol=1e-5)
    assert (keys - tiny(family)(x).logits).abs().max() > 1e-2  # the scaling did act
