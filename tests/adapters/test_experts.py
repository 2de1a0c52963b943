"""Per-expert LoRA on fused routed experts (moe_lora/adapters/experts.py) against peft's
``target_parameters`` and a per-token reference: equal random weights give equal logits and
gradients on every fused family of tests/fixtures/moe.py; equal trainable counts; only the adapter
trains; the base's routing weights and choices are the ones used."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from moe_lora.adapters.experts import IA3OnExperts, LoRAOnExperts, expert_rank, from_peft, merge_experts, to_peft
from moe_lora.adapters.inject import inject_adapter
from moe_lora.adapters.merging import merge, refuse_routed
from moe_lora.adapters.variants.lora import LoRAConfig
from moe_lora.config import LayoutConfig, ModelConfig
from moe_lora.errors import ConfigError
from tests.fixtures.moe import MOE_FAMILIES, moe_config

PROJECTIONS = ["gate_up_proj", "down_proj"]
KERNELS = ["csr", "grouped_mm"]


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(moe_config(family, 100)).eval()


def experts_paths(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n.endswith("mlp.experts") and hasattr(m, "down_proj")]


def peft_and_ours(family: str, rank: int = 4, alpha: float = 8.0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """peft's ``target_parameters`` model (random A and B) and ours with the same weights."""
    model = tiny(family)
    ours = copy.deepcopy(model)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=[], target_parameters=[f"experts.{p}" for p in PROJECTIONS]
    )
    torch.manual_seed(1)
    peft_model = get_peft_model(model, config)
    for p in ours.parameters():
        p.requires_grad_(False)
    for path in experts_paths(ours):
        parent_path, _, child = path.rpartition(".")
        wrapped = LoRAOnExperts(ours.get_submodule(path), PROJECTIONS, rank=rank, alpha=alpha)
        layer = peft_model.base_model.model.get_submodule(path)
        while hasattr(layer, "parameter_name"):  # peft nests one ParamWrapper per targeted parameter
            with torch.no_grad():
                layer.lora_B["default"].weight.normal_(0.0, 0.5)  # peft's B starts at 0: make it count
                A, B = from_peft(layer.lora_A["default"].weight, layer.lora_B["default"].weight, wrapped.num_experts)
                wrapped.lora[layer.parameter_name].lora_A.copy_(A)
                wrapped.lora[layer.parameter_name].lora_B.copy_(B)
            layer = layer.base_layer
        setattr(ours.get_submodule(parent_path), child, wrapped)
    return peft_model, ours


def ours_only(family: str) -> torch.nn.Module:
    """A tiny ``family`` model with LoRA on every layer's routed experts, nonzero random A and B."""
    model = tiny(family)
    torch.manual_seed(1)
    for path in experts_paths(model):
        parent_path, _, child = path.rpartition(".")
        wrapped = LoRAOnExperts(model.get_submodule(path), PROJECTIONS, rank=4, alpha=8.0)
        with torch.no_grad():
            for lora in wrapped.lora.values():  # A is kaiming-uniform already; B starts at 0
                lora.lora_B.normal_(0.0, 0.5)
        setattr(model.get_submodule(parent_path), child, wrapped)
    return model


def one_experts(family: str) -> LoRAOnExperts:
    """The first sparse layer's adapted experts (:func:`ours_only`)."""
    model = ours_only(family)
    return model.get_submodule(experts_paths(model)[0])


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_equals_peft_target_parameters(family: str) -> None:
    """Logits within float32 round-off of peft's, far from the base's; the same trainable count;
    gradients equal peft's (mapped by from_peft) and reach the adapter only."""
    peft_model, ours = peft_and_ours(family)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    with peft_model.disable_adapter(), torch.no_grad():
        base = peft_model(ids).logits
    theirs, mine = peft_model(ids).logits, ours(ids).logits
    assert (theirs - base).abs().max() > 1e-2  # the adapters change the logits
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=2e-6)
    ours_trainable, peft_trainable = trainable(ours), trainable(peft_model)
    assert sum(p.numel() for p in ours_trainable.values()) == sum(p.numel() for p in peft_trainable.values())
    assert all(".lora." in n and n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in ours_trainable)
    weights = torch.linspace(-1, 1, mine.numel()).view_as(mine)
    (theirs * weights).sum().backward()
    (mine * weights).sum().backward()
    assert all(p.grad is None for n, p in ours.named_parameters() if n not in ours_trainable)
    for path in experts_paths(peft_model.base_model.model):
        layer, wrapped = peft_model.base_model.model.get_submodule(path), ours.get_submodule(path)
        while hasattr(layer, "parameter_name"):
            A, B = from_peft(layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad, 4)
            own = wrapped.lora[layer.parameter_name]
            torch.testing.assert_close(own.lora_A.grad, A, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(own.lora_B.grad, B, rtol=1e-4, atol=1e-6)
            layer = layer.base_layer


def reference(wrapped: LoRAOnExperts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Token by token, choice by choice: ``sum_j w_j down_e(act(gate_up_e(x)))`` with each
    projection ``W_e x + b_e + s B_e A_e x`` (weights read as [E, out, in] or [E, in, out])."""
    base = wrapped.base

    def project(name: str, e: int, v: torch.Tensor) -> torch.Tensor:
        W = getattr(base, name)[e]
        out = v @ W if base.is_transposed else W @ v
        out = out + (getattr(base, f"{name}_bias")[e] if base.has_bias else 0)
        lora = wrapped.lora[name]
        r = lora.rank
        A, B = lora.lora_A[:, e * r : (e + 1) * r], lora.lora_B[e * r : (e + 1) * r]
        return out + lora.scaling * (v @ A) @ B

    rows = []
    for t in range(x.shape[0]):
        total = torch.zeros(x.shape[1])
        for j in range(index.shape[1]):
            e = int(index[t, j])
            if e >= wrapped.num_experts:  # a null expert's pick adds nothing
                continue
            h = base._apply_gate(project("gate_up_proj", e, x[t]))
            total = total + weights[t, j] * project("down_proj", e, h)
        rows.append(total)
    return torch.stack(rows)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_uses_the_given_routing(family: str, kernel: str) -> None:
    """Per-token reference with arbitrary (unnormalised, signed) routing weights and choices, both
    kernels: a forward that ignored or reordered the weights or the choices would differ."""
    wrapped = one_experts(family)
    wrapped.kernel = kernel
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 32, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(9)])
    weights = torch.randn(9, 2, generator=g)
    with torch.no_grad():
        got = wrapped(x, index, weights)
        torch.testing.assert_close(got, reference(wrapped, x, index, weights), rtol=1e-5, atol=1e-5)
        assert (got - wrapped(x, index, weights.flip(-1))).abs().max() > 1e-3


@pytest.mark.parametrize("kernel", KERNELS)
def test_null_picks_add_nothing(kernel: str) -> None:
    """Picks of index num_experts (null experts added to a base router) are skipped, as the eager
    forward skips them, whatever their weight; no NaN reaches the output or the gradients."""
    wrapped = one_experts("gpt_oss")
    wrapped.kernel = kernel
    g = torch.Generator().manual_seed(6)
    x = torch.randn(12, 32, generator=g, requires_grad=True)
    index = torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(12)])  # 4: the null expert
    assert (index == 4).any()
    weights = torch.rand(12, 3, generator=g)
    out = wrapped(x, index, weights)
    torch.testing.assert_close(out, reference(wrapped, x.detach(), index, weights).detach(), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in wrapped.lora.parameters())


def test_kernels_agree_forward_and_backward() -> None:
    """The CPU's CSR kernels and the grouped GEMM a GPU runs: equal outputs and adapter gradients."""
    wrapped = one_experts("olmoe")
    g = torch.Generator().manual_seed(4)
    x, weights = torch.randn(40, 32, generator=g), torch.rand(40, 2, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(40)])
    runs = []
    for kernel in KERNELS:
        wrapped.kernel = kernel
        wrapped.zero_grad(set_to_none=True)
        out = wrapped(x, index, weights)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        runs.append([out, *(p.grad for p in wrapped.lora.parameters())])
    for a, b in zip(*runs, strict=True):  # gradients summed in another order: float32 round-off
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_weights_map_to_peft_and_back() -> None:
    A, B = torch.randn(5, 3 * 2), torch.randn(3 * 2, 7)
    torch.testing.assert_close(from_peft(*to_peft(A, B, 3), 3), (A, B))
    pA, pB = to_peft(A, B, 3)
    assert pA.shape == (6, 5) and pB.shape == (7, 6)
    # expert 1's second rank column: our A column 1*2+1, peft's B column rank-major 1*3+1
    torch.testing.assert_close(pB[:, 1 * 3 + 1], B[1 * 2 + 1])


def test_expert_rank_settings() -> None:
    assert expert_rank("rank", 8, 4) == 8 and expert_rank("rank/num_experts", 8, 4) == 2
    assert expert_rank(3, 8, 4) == 3 and expert_rank("5", 8, 4) == 5
    for bad, says in [("rank/num_experts", "not a multiple"), ("0", "positive integer"), ("r/E", "'rank'")]:
        with pytest.raises(ConfigError, match=says):
            expert_rank(bad, 6, 4)


def test_refuses_what_is_not_a_transformers_experts_module() -> None:
    fake = torch.nn.Module()
    fake.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 8, 4))
    with pytest.raises(ConfigError, match=r"not a transformers experts module .* lacks has_gate"):
        LoRAOnExperts(fake, PROJECTIONS, rank=2, alpha=2.0, where="layers.0.mlp.experts")
    experts = tiny("mixtral").model.layers[0].mlp.experts
    with pytest.raises(ConfigError, match="'w2' is not a fused expert projection of MixtralExperts"):
        LoRAOnExperts(experts, ["w2"], rank=2, alpha=2.0)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_merged_equals_adapted(family: str) -> None:
    """Folding every expert's update into the fused tensors (either axis order) keeps the logits."""
    ours = ours_only(family)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        adapted = ours(ids).logits
        assert merge_experts(ours) == experts_paths(ours) and not any(
            isinstance(m, LoRAOnExperts) for m in ours.modules()
        )
        torch.testing.assert_close(ours(ids).logits, adapted, rtol=1e-5, atol=2e-6)


def test_expert_rank_from_the_config_through_injection() -> None:
    """``adapter.expert_rank=rank/num_experts`` (peft's advice) gives each of 4 experts rank 8/4 = 2
    through injection: peft's count at r=2; a bad setting fails when the config is built."""
    model = tiny("mixtral")
    cfg = LoRAConfig(rank=8, expert_rank="rank/num_experts", target_modules=["experts"])
    names = inject_adapter(model, cfg, ModelConfig(source="hub", name_or_path="mixtral"), LayoutConfig())
    assert names == [f"model.layers.{i}.mlp.experts" for i in range(3)]
    assert {m.rank for m in model.modules() if isinstance(m, LoRAOnExperts)} == {2}
    peft_model = get_peft_model(
        tiny("mixtral"), LoraConfig(r=2, target_modules=[], target_parameters=[f"experts.{p}" for p in PROJECTIONS])
    )
    assert sum(p.numel() for p in trainable(model).values()) == sum(p.numel() for p in trainable(peft_model).values())
    with pytest.raises(ConfigError, match=r"adapter\.expert_rank='r/4'"):
        LoRAConfig(expert_rank="r/4")


def test_peft_export_refused_merged_allowed() -> None:
    """peft's format for expert tensors (nested ParamWrappers) is not written: one line, not a silent
    subset of the adapter; merging folds them."""
    ours = ours_only("qwen3_moe")
    with pytest.raises(ConfigError, match="does not export in peft's format"):
        refuse_routed(ours, "lora", "peft")
    refuse_routed(ours, "lora", "merged")
    assert merge(ours, "lora") == experts_paths(ours)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_ia3_on_experts(family: str) -> None:
    """Per-expert IA3 against the per-token reference: expert e's gate_up output (bias included)
    times its l_e, its down_proj input times its own l_e; ones at init give the base; merging folds
    both into the fused tensors (either axis order, with biases)."""
    model = tiny(family)
    path = experts_paths(model)[0]
    base = model.get_submodule(path)
    wrapped = IA3OnExperts(base, PROJECTIONS)
    g = torch.Generator().manual_seed(7)
    x, weights = torch.randn(9, 32, generator=g), torch.rand(9, 2, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(9)])
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x, index, weights), base(x, index, weights), rtol=1e-5, atol=1e-6)
        for part in wrapped.ia3.values():
            part.ia3_l.uniform_(0.5, 1.5, generator=g)
        up, down = wrapped.ia3["gate_up_proj"].ia3_l, wrapped.ia3["down_proj"].ia3_l
        rows = []
        for t in range(9):
            total = torch.zeros(32)
            for j in range(2):
                e = int(index[t, j])
                W, Wd = base.gate_up_proj[e], base.down_proj[e]
                gu = (x[t] @ W if base.is_transposed else W @ x[t]) + (
                    base.gate_up_proj_bias[e] if base.has_bias else 0
                )
                h = base._apply_gate(gu * up[e]) * down[e]
                y = (h @ Wd if base.is_transposed else Wd @ h) + (base.down_proj_bias[e] if base.has_bias else 0)
                total = total + weights[t, j] * y
            rows.append(total)
        got = wrapped(x, index, weights)
        torch.testing.assert_close(got, torch.stack(rows), rtol=1e-5, atol=1e-5)
        merged = wrapped.merged()
        torch.testing.assert_close(merged(x, index, weights), got, rtol=1e-5, atol=1e-5)
