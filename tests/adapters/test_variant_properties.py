"""One test per variant for its defining property."""

from __future__ import annotations

import pytest
import torch

from moe_lora.adapters.adamoe import AdaMoEConfig
from moe_lora.adapters.alora import ALoRAConfig, ALoRALinear, alora_layers, reallocate
from moe_lora.adapters.hydralora import HydraLoRAConfig
from moe_lora.adapters.inject import inject_adapter
from moe_lora.adapters.layer import LoRAExperts
from moe_lora.adapters.melora import MELoRAConfig, MELoRALinear
from moe_lora.adapters.mola import MoLAConfig
from moe_lora.adapters.mov import MoVConfig, MoVLinear
from moe_lora.config import LayoutConfig
from moe_lora.errors import ConfigError
from moe_lora.routing.recorder import RoutingRecorder
from tests.adapters.test_lora_peft import MODEL_CFG, tiny_llama
from tests.adapters.test_variants import perturb


def test_hydralora_has_one_A_per_linear_and_N_heads() -> None:
    model = tiny_llama()
    names = inject_adapter(model, HydraLoRAConfig(rank=4, num_experts=3), MODEL_CFG, LayoutConfig())
    for name in names:
        layer: LoRAExperts = model.get_submodule(name)
        assert layer.lora_A.shape == (layer.d_in, 4) and layer.lora_B.shape == (3 * 4, layer.d_out)
    layer = model.get_submodule(names[0])
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, layer.d_in)
    gate = layer.router(x)  # soft: sum_i p_i B_i A x
    expected = layer.base(x) + layer.scaling * sum(
        gate[:, i: i + 1] * (x @ layer.lora_A @ layer.lora_B[4 * i: 4 * (i + 1)]) for i in range(3))
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_melora_equals_block_diagonal_lora() -> None:
    model = tiny_llama()
    names = inject_adapter(model, MELoRAConfig(rank=2, num_minis=4), MODEL_CFG, LayoutConfig())
    assert len(names) == 4  # q, v in 2 layers
    layer: MELoRALinear = model.get_submodule(names[0])
    perturb(model)
    x = torch.randn(3, 5, layer.d_in)
    delta = layer.delta_weight()
    blocks = delta.reshape(4, layer.d_out // 4, 4, layer.d_in // 4)
    off_diagonal = [blocks[i, :, j] for i in range(4) for j in range(4) if i != j]
    assert all(torch.equal(b, torch.zeros_like(b)) for b in off_diagonal)
    assert torch.linalg.matrix_rank(delta) <= 4 * 2
    assert torch.allclose(layer(x), layer.base(x) + x @ delta.T, atol=1e-5)
    lora_params = 2 * (layer.d_in + layer.d_out)  # one rank-2 LoRA on the full matrix
    assert layer.lora_A.numel() + layer.lora_B.numel() == lora_params


def test_melora_minis_must_divide_dims() -> None:
    with pytest.raises(ConfigError, match=r"adapter\.num_minis"):
        inject_adapter(tiny_llama(), MELoRAConfig(num_minis=5), MODEL_CFG, LayoutConfig())


def test_mov_routes_on_the_activation_it_rescales() -> None:
    model = tiny_llama()
    names = inject_adapter(model, MoVConfig(num_experts=3), MODEL_CFG, LayoutConfig())
    k: MoVLinear = model.get_submodule(next(n for n in names if n.endswith("k_proj")))
    down: MoVLinear = model.get_submodule(next(n for n in names if n.endswith("down_proj")))
    head_dim = 32 // 4
    assert k.router.weight.shape == (3, head_dim) and down.router.weight.shape == (3, 64)
    seen = []
    k.router.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    x = torch.randn(2, 3, 32)
    k(x)
    assert torch.equal(seen[0], k.base(x).unflatten(-1, (4, head_dim)))  # per head, one shared router
    with torch.no_grad():
        k.ia3_v[1].fill_(2.0)
        gate = k.router(k.base(x).unflatten(-1, (4, head_dim)))
        expected = k.base(x).unflatten(-1, (4, head_dim)) * (1 + gate[..., 1:2])
        assert torch.allclose(k(x), expected.flatten(-2), atol=1e-6)


@pytest.mark.parametrize(("layers", "experts", "expected"), [
    (4, [2, 4, 6, 8], [2, 4, 6, 8]),  # one group per layer
    (8, [8, 2, 2, 8], [8, 8, 2, 2, 2, 2, 8, 8]),  # hourglass over 8 layers: floor(l * 4 / 8)
    (2, [3, 5], [3, 5]),  # an explicit per-layer list
    (4, [6], [6, 6, 6, 6]),
])
def test_mola_per_layer_experts_follow_the_layout(layers, experts, expected) -> None:
    model = tiny_llama(layers=layers)
    cfg = MODEL_CFG.__class__(**{**MODEL_CFG.__dict__, "num_layers": layers})
    names = inject_adapter(model, MoLAConfig(), cfg, LayoutConfig(name="custom", experts=experts))
    assert len(names) == 7 * layers
    for n in names:
        layer = int(n.split(".")[2])
        assert model.get_submodule(n).num_experts == expected[layer] == model.get_submodule(n).router.num_experts


def test_layout_misfits_are_errors_naming_the_key() -> None:
    cfg = MODEL_CFG
    with pytest.raises(ConfigError, match=r"layout\.experts"):
        inject_adapter(tiny_llama(), MoLAConfig(), cfg, LayoutConfig(name="custom", experts=[1, 2, 3]))
    with pytest.raises(ConfigError, match=r"adapter\.top_k"):
        inject_adapter(tiny_llama(), MoLAConfig(top_k=3), cfg, LayoutConfig(name="custom", experts=[2, 4]))


def test_adamoe_null_experts_add_nothing() -> None:
    model, rec = tiny_llama(), RoutingRecorder()
    names = inject_adapter(model, AdaMoEConfig(num_experts=4, num_null_experts=2, top_k=2), MODEL_CFG,
                           LayoutConfig(), rec)
    perturb(model)
    layer: LoRAExperts = model.get_submodule(names[0])
    assert layer.router.weight.shape[0] == 6 and layer.lora_B.shape[0] == 4 * layer.rank  # no weights for nulls
    x = torch.randn(7, layer.d_in)
    null_only = torch.full((7, 6), -1e4)
    null_only[:, 4:] = 0.0  # every token's top-2 are the two null experts
    gate = layer.router.gate
    layer.router.gate = lambda logits, dtype: gate(null_only.expand(*logits.shape[:-1], 6), dtype)
    assert torch.allclose(layer(x), layer.base(x))
    with rec.batch(torch.ones(1, 7), torch.tensor([0])):
        layer(x.unsqueeze(0))
    row = next(r for r in rec.flush(1) if r["task_type"] == "all")
    assert row["null_rate"] == 1.0 and row["real_experts_per_token"] == 0.0


def test_alora_reallocation_keeps_budget_and_prunes_cheapest() -> None:
    model = tiny_llama()
    inject_adapter(model, ALoRAConfig(target_modules=["ffn"], rank=2, max_rank=4), MODEL_CFG, LayoutConfig())
    layers = alora_layers(model)
    names = list(layers)
    # A made-up validation loss: each active component lowers it by its own value.
    value = {(n, i): 1.0 + 0.1 * j + i for j, n in enumerate(names) for i in range(4)}
    value[(names[3], 1)] = 0.01  # the cheapest to ablate

    def val_loss() -> float:
        return 100.0 - sum(v for (n, i), v in value.items() if layers[n].adapter_active[i] > 0)

    budget = sum(m.active_rank for m in layers.values())
    moved = reallocate(layers, val_loss, prune=1)
    assert moved["pruned"] == [f"{names[3]}[1]"]
    assert sum(m.active_rank for m in layers.values()) == budget
    best = max(names, key=lambda n: sum(value[(n, i)] for i in range(2)))
    assert moved["granted"] == [best] and layers[best].active_rank == 3
    layer: ALoRALinear = layers[best]
    assert torch.equal(layer.lora_B[2], torch.zeros_like(layer.lora_B[2]))  # granted: function unchanged


def test_in_place_update_on_gpt2_conv1d_matches_out_of_place() -> None:
    """GPT-2's Conv1D returns a view of its addmm; the update goes into the viewed tensor, and
    outputs and gradients equal base(x) + the low-rank term computed out of place."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(12, 16).requires_grad_(False)  # nf=12 outputs, nx=16 inputs
    layer = LoRAExperts(base, rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = layer(x)
    ref = base(x_ref) + layer.scaling * (x_ref @ layer.lora_A.detach()) @ layer.lora_B.detach()
    assert torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    added = out.grad_fn.next_functions[0][0]  # out is a view of the tensor the update was added into
    assert type(added).__name__.startswith("Addmm"), type(added).__name__  # not CopySlices
