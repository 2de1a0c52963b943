"""peft as the numerical cross-check: our LoRA and IA3 equal peft's for equal weights, and our
initialisations are drawn from peft's distributions; LoRAMoE wiring."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from moe_lora.adapters.inject import inject_adapter
from moe_lora.adapters.layer import LoRAExperts
from moe_lora.adapters.variants.ia3 import IA3Config, IA3Linear
from moe_lora.adapters.variants.lora import LoRAConfig
from moe_lora.adapters.variants.loramoe import LoRAMoEConfig
from moe_lora.adapters.variants.mola import MoLAConfig
from moe_lora.config import LayoutConfig, ModelConfig
from moe_lora.routing.recorder import RoutingRecorder

MODULES = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "ffn": ["gate_proj", "up_proj", "down_proj"],
    "query": ["q_proj"],
    "key": ["k_proj"],
    "value": ["v_proj"],
    "output": ["o_proj"],
    "ffn_out": ["down_proj"],
}
MODEL_CFG = ModelConfig(
    name="t",
    source="world",
    modules=MODULES,
    num_layers=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=4,
    num_kv_heads=4,
)


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("targets", [["ffn"], ["all"], ["q_proj", "v_proj"]])
def test_lora_matches_peft(targets: list[str]) -> None:
    names = (
        [n for t in targets for n in MODULES.get(t, [t])]
        if targets != ["all"]
        else MODULES["attention"] + MODULES["ffn"]
    )
    peft_model = get_peft_model(
        tiny_llama(), PeftLoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=names)
    ).eval()
    ours = tiny_llama()
    adapted = inject_adapter(ours, LoRAConfig(target_modules=targets, rank=8, alpha=16.0), MODEL_CFG, LayoutConfig())
    assert len(adapted) == 2 * len(names)
    torch.manual_seed(1)
    with torch.no_grad():
        for name in adapted:
            mine: LoRAExperts = ours.get_submodule(name)
            theirs = peft_model.base_model.model.get_submodule(name)
            theirs.lora_B["default"].weight.normal_()
            mine.lora_A.copy_(theirs.lora_A["default"].weight.T)
            mine.lora_B.copy_(theirs.lora_B["default"].weight.T)
    x = torch.randint(0, 50, (3, 11))
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, peft_model(x).logits, atol=1e-5)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_B")) for n in trainable) and len(trainable) == 2 * len(adapted)


def test_lora_is_identity_at_init() -> None:
    base, ours = tiny_llama(), tiny_llama()
    inject_adapter(ours, LoRAConfig(target_modules=["all"]), MODEL_CFG, LayoutConfig())
    x = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(base(x).logits, ours(x).logits)


def test_loramoe_routers_report_to_the_recorder_and_add_the_lbc() -> None:
    """Every adapted linear's router is attached; the LBC reaches the loss (save/load, gradients
    and the rest are in the registry matrix of test_variants.py)."""
    model, rec = tiny_llama(), RoutingRecorder()
    adapted = inject_adapter(model, LoRAMoEConfig(num_experts=4, dropout=0.0), MODEL_CFG, LayoutConfig(), rec)
    assert len(adapted) == 6 and set(rec.routers) == set(adapted)
    x = torch.randint(0, 50, (2, 7))
    with rec.batch(torch.ones(2, 7), torch.tensor([0, 1])):
        model(x, labels=x)
    aux = rec.pop_aux_loss()
    assert aux is not None and aux.item() > 0 and aux.requires_grad


def test_ia3_matches_peft() -> None:
    """k/v outputs and the down_proj input scaled, as peft's IA3 with down_proj a feed-forward module."""
    names = ["k_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(
        tiny_llama(), PeftIA3Config(target_modules=names, feedforward_modules=["down_proj"])
    ).eval()
    ours = tiny_llama()
    adapted = inject_adapter(ours, IA3Config(), MODEL_CFG, LayoutConfig())
    assert len(adapted) == 2 * len(names)
    torch.manual_seed(1)
    with torch.no_grad():
        for name in adapted:
            mine: IA3Linear = ours.get_submodule(name)
            theirs = peft_model.base_model.model.get_submodule(name).ia3_l["default"]
            theirs.normal_(1.0, 0.3)  # away from 1, so that a wrong site or axis shows
            assert theirs.numel() == mine.ia3_l.numel()
            mine.ia3_l.copy_(theirs.flatten())
    x = torch.randint(0, 50, (3, 11))
    with torch.no_grad():
        assert not torch.allclose(ours(x).logits, tiny_llama()(x).logits, atol=1e-3)
        assert torch.allclose(ours(x).logits, peft_model(x).logits, atol=1e-5)


def _wide_llama() -> LlamaForCausalLM:
    """Wide enough (256 -> 4 x 128 A entries per linear) for distribution checks to be sharp."""
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("variant", ["lora", "mola"])
def test_initialisation_is_peft_kaiming_for_A_and_zero_for_B(variant: str) -> None:
    """A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (peft's kaiming-uniform, a=sqrt 5), each expert's block
    alike, and B = 0: compared with peft's own draw by quantiles, not just by the bound."""
    torch.manual_seed(0)
    peft_model = get_peft_model(_wide_llama(), PeftLoraConfig(r=64, lora_alpha=64, target_modules=["q_proj"]))
    theirs = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    peft_A = theirs.lora_A["default"].weight.detach().flatten()
    cfg = (
        LoRAConfig(target_modules=["q_proj"], rank=64)
        if variant == "lora"
        else MoLAConfig(target_modules=["q_proj"], rank=16, num_experts=4)
    )
    model_cfg = MODEL_CFG.__class__(**{**MODEL_CFG.__dict__, "hidden_size": 256, "num_layers": 1})
    model = _wide_llama()
    torch.manual_seed(1)
    (name,) = inject_adapter(model, cfg, model_cfg, LayoutConfig())
    mine: LoRAExperts = model.get_submodule(name)
    bound = 1 / 256**0.5
    assert peft_A.abs().max() <= bound and mine.lora_A.abs().max() <= bound
    q = torch.linspace(0.01, 0.99, 99)
    for block in mine.lora_A.detach().split(mine.rank, dim=1):  # every expert's A on its own
        assert (block.flatten().quantile(q) - peft_A.quantile(q)).abs().max() < 0.08 * bound
    assert torch.count_nonzero(mine.lora_B) == 0 and torch.count_nonzero(theirs.lora_B["default"].weight) == 0
