"""The grouped top-k path (adapter.expert_compute=grouped) equals the dense masked gate: outputs
and every gradient, in float32 and under bfloat16 autocast, with many experts and null experts."""

from __future__ import annotations

import pytest
import torch

from moe_lora.adapters.layer import LoRAExperts
from moe_lora.routing.router import Router, route, softmax_experts

KERNELS = ["csr", *(["grouped_mm"] if hasattr(torch, "_grouped_mm") else [])]


def _pair(num_experts: int, top_k: int, num_null: int) -> tuple[LoRAExperts, LoRAExperts]:
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 48).requires_grad_(False)
    layers = []
    for grouped in (False, True):
        layer = LoRAExperts(
            base,
            rank=8,
            alpha=16.0,
            num_experts=num_experts,
            grouped=grouped,
            router=Router(32, num_experts, top_k=top_k, num_null=num_null),
        )
        layers.append(layer)
    dense, grouped = layers
    with torch.no_grad():
        dense.lora_B.normal_()
    grouped.load_state_dict(dense.state_dict())
    return dense, grouped


@pytest.mark.parametrize("num_experts,top_k,num_null", [(8, 2, 0), (64, 2, 0), (6, 3, 2), (10, 2, 3)])
@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_equals_dense(num_experts: int, top_k: int, num_null: int, autocast: bool) -> None:
    dense, grouped = _pair(num_experts, top_k, num_null)
    assert grouped.grouped and not dense.grouped
    x = torch.randn(3, 40, 32)
    runs_of = [("dense", dense, False), ("grouped", grouped, False)]
    if autocast:
        runs_of += [("dense_bf16", dense, True), ("grouped_bf16", grouped, True)]
    for kernel in KERNELS:  # the CPU's CSR kernels, and the grouped GEMM a GPU runs
        grouped.kernel = kernel
        runs = {name: _run(layer, x, cast) for name, layer, cast in runs_of}
        if autocast and kernel == "csr":
            # the CSR kernels compute in float32 under autocast too: no further from float32 than the
            # dense gate's bfloat16 GEMMs are (the base layer and the output stay bfloat16 in both)
            for got, bf16, ref in zip(runs["grouped_bf16"], runs["dense_bf16"], runs["dense"], strict=True):
                assert (got - ref).abs().max() <= 1.01 * (bf16 - ref).abs().max() + 1e-6, kernel
            continue
        got, ref = runs["grouped_bf16" if autocast else "grouped"], runs["dense_bf16" if autocast else "dense"]
        tol = dict(rtol=3e-2, atol=3e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[0], ref[0], **tol, msg=lambda m, k=kernel: f"{k}: {m}")
        # the gradients sum over tokens in another order (per expert group, not per token): float32
        # round-off of ~1e-5 on sums of 120 terms
        grad_tol = tol if autocast else dict(rtol=1e-4, atol=5e-5)
        for g, g_ref in zip(got[1:], ref[1:], strict=True):
            torch.testing.assert_close(g, g_ref, **grad_tol, msg=lambda m, k=kernel: f"{k}: {m}")


def _run(layer: LoRAExperts, x: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
    """The output and the gradients of input, A, B and router of one forward and backward."""
    xi = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(xi)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.float(), xi.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad]


def test_choose_gives_the_dense_gate_at_the_chosen_experts() -> None:
    torch.manual_seed(1)
    router = Router(16, 5, top_k=3, num_null=2)
    x = torch.randn(50, 16)
    weights, experts = router.choose(x)
    gate, _ = route(softmax_experts(router.logits(x)), 3, 5)
    assert weights.shape == experts.shape == (50, 3) and int(experts.max()) <= 5  # 5: a null pick
    assert (weights[experts == 5] == 0).all() and (experts == 5).any()
    scattered = torch.zeros(50, 6).scatter_add_(-1, experts, weights)
    torch.testing.assert_close(scattered[:, :5], gate)


def test_auto_groups_where_it_is_faster_and_the_kernel_applies() -> None:
    from moe_lora.adapters.layer import AUTO_GROUPED_PER_CHOICE

    base = torch.nn.Linear(32, 48).requires_grad_(False)
    x = torch.randn(4, 32)

    def layer(experts: int, rank: int = 8, top_k: int | None = 2) -> LoRAExperts:
        return LoRAExperts(
            base, rank=rank, alpha=8.0, num_experts=experts, grouped="auto", router=Router(32, experts, top_k=top_k)
        )

    many = 2 * AUTO_GROUPED_PER_CHOICE
    assert layer(many).use_grouped(x, torch.float32) and layer(many).use_grouped(x, torch.bfloat16)
    assert not layer(AUTO_GROUPED_PER_CHOICE).use_grouped(x, torch.float32)  # 16 experts, top-2: dense
    assert not layer(many, top_k=None).use_grouped(x, torch.float32)  # soft routing: every expert
    assert layer(many, rank=6).use_grouped(x, torch.float32)  # the CPU's CSR kernels take any rank
    gpu_kernel = layer(many, rank=6)
    gpu_kernel.kernel = "grouped_mm"
    assert not gpu_kernel.use_grouped(x, torch.float32)  # 24-byte rows: the grouped GEMM refuses them
    assert layer(many, rank=8).use_grouped(x, torch.bfloat16)
    auto, dense = layer(many), layer(many)
    dense.auto = False
    dense.load_state_dict(auto.state_dict())
    torch.testing.assert_close(auto(x), dense(x), rtol=1e-5, atol=1e-5)


def test_null_picks_dropped_or_kept_at_weight_zero_give_the_same_update() -> None:
    """The CPU drops the pairs of null picks; a GPU keeps them with the last expert at weight 0
    (static shapes): both are the same sum."""
    from moe_lora.adapters.layer import grouped_update_

    torch.manual_seed(2)
    x, A, B = torch.randn(30, 16), torch.randn(16, 4 * 8), torch.randn(4 * 8, 24)
    weights, experts = Router(16, 4, top_k=3, num_null=3).choose(x)
    assert (experts == 4).any()
    outs = []
    for drop in (True, False):
        out = torch.zeros(30, 24)
        grouped_update_(out, x, weights, experts, A, B, 4, 0.5, drop_null=drop)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("num_null", [0, 3])
def test_csr_update_equals_the_grouped_gemm_with_null_and_empty_picks(num_null: int) -> None:
    """The CPU's CSR kernels give the grouped GEMM's update and gradients, with null picks (some
    tokens pick only null experts) and with a batch in which nothing picks a real expert."""
    from moe_lora.adapters.csr import csr_update_
    from moe_lora.adapters.layer import grouped_update_

    torch.manual_seed(3)
    router = Router(16, 4, top_k=3, num_null=num_null)
    x = torch.randn(30, 16)
    weights, experts = router.choose(x)
    A, B = torch.randn(16, 32), torch.randn(32, 24)
    cases = [(weights, experts), (weights, torch.full_like(experts, 4))] if num_null else [(weights, experts)]
    for w, e in cases:
        results = []
        for update in (csr_update_, grouped_update_):
            leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, A, B)]
            out = torch.zeros(30, 24)
            update(out, leaves[0], leaves[1], e, leaves[2], leaves[3], 4, 0.5)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            results.append([out.detach(), *(t.grad for t in leaves)])
        for got, ref in zip(*results, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
