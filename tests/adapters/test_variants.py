"""A test matrix over the adapter registry: a new variant is picked up without editing this file.

For every variant: injection count, trainable set, output equal to the base model at init (every
variant here is an identity at init: B=0 or IA3 vectors = 1), gradients reach every trainable
tensor, save/load round-trips, and a few steps on a fixed batch lower the loss.
"""

from __future__ import annotations

import pytest
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from moe_lora.adapters import ADAPTERS
from moe_lora.adapters.inject import inject_adapter
from moe_lora.config import LayoutConfig
from moe_lora.routing.recorder import RoutingRecorder
from moe_lora.train.checkpoint import adapter_state, load_adapter
from tests.adapters.test_lora_peft import MODEL_CFG, MODULES, tiny_llama

VARIANTS = list(ADAPTERS)


def default_config(name: str):
    """The variant's YAML defaults are its dataclass defaults; build them from the schema."""
    node = ConfigStore.instance().load(f"schema/adapter/{name}.yaml").node
    return OmegaConf.to_object(OmegaConf.merge(node, {"name": name}))


def expected_targets(model, targets: list[str]) -> list[str]:
    """The Llama linears that role, block and module-name targets name (written out here, not asked
    of moe_lora.model.structure)."""
    names = [n for t in targets for n in (MODULES["attention"] + MODULES["ffn"] if t == "all" else MODULES.get(t, [t]))]
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n == p or n.endswith("." + p) for p in names)
    ]


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (4, 16), generator=g)


def perturb(model) -> None:
    """Move every trainable tensor off its init so that gradients can reach all of them."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", VARIANTS)
def test_injection_count_and_trainable_set(name: str) -> None:
    cfg, spec = default_config(name), ADAPTERS.get(name)
    model = tiny_llama()
    expected = expected_targets(model, cfg.target_modules) if spec.wrap else []
    adapted = inject_adapter(model, cfg, MODEL_CFG, LayoutConfig(), RoutingRecorder())
    assert adapted == expected and (len(adapted) > 0) == (spec.wrap is not None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if spec.trains_base:
        assert len(trainable) == len(list(model.parameters()))
    else:
        assert spec.wrap is not None or not trainable, trainable
        if spec.wrap is not None:  # the variant's declared tensor names (the saver's): each one, and nothing else
            assert {p for p in spec.prefixes if any(n.endswith(p) for n in trainable)} == set(spec.prefixes)
            assert all(n.endswith(spec.prefixes) for n in trainable), (spec.prefixes, trainable)
        assert all(any(n.startswith(a + ".") for a in adapted) for n in trainable)


@pytest.mark.parametrize("name", VARIANTS)
def test_identity_at_init(name: str) -> None:
    base, model = tiny_llama(), tiny_llama()
    inject_adapter(model, default_config(name), MODEL_CFG, LayoutConfig(), RoutingRecorder())
    x = batch()
    with torch.no_grad():
        assert torch.allclose(model(x).logits, base(x).logits, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "none"])
def test_gradients_reach_every_trainable_tensor(name: str) -> None:
    model, rec = tiny_llama(), RoutingRecorder()
    inject_adapter(model, default_config(name), MODEL_CFG, LayoutConfig(), rec)
    perturb(model)
    model.train()
    x = batch()
    with rec.batch(torch.ones_like(x), torch.tensor([0, 1, 0, 1])):
        loss = model(x, labels=x).loss
    aux = rec.pop_aux_loss()
    (loss + (aux if aux is not None else 0)).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "none"])
def test_save_load_round_trip_and_training_lowers_loss(name: str, tmp_path) -> None:
    cfg = default_config(name)
    model, rec = tiny_llama(), RoutingRecorder()
    inject_adapter(model, cfg, MODEL_CFG, LayoutConfig(), rec)
    perturb(model)
    x = batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(6):
        with rec.batch(torch.ones_like(x), torch.tensor([0, 1, 0, 1])):
            loss = model(x, labels=x).loss
        aux = rec.pop_aux_loss()
        (loss + (aux if aux is not None else 0)).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    from safetensors.torch import save_file

    save_file(adapter_state(model), str(tmp_path / "a.safetensors"))
    fresh = tiny_llama()
    inject_adapter(fresh, cfg, MODEL_CFG, LayoutConfig())
    load_adapter(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)
