"""The vectorised expert layer (dense, and grouped for top-k) equals the loop reference (output and
gradients) for soft, top-k, null-expert and shared-A routing; the benchmark runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from moe_lora.adapters.layer import LoRAExperts
from moe_lora.bench.reference import LoopMoELoRA
from moe_lora.bench.run import large_args, parse
from moe_lora.bench.run import main as bench_main
from moe_lora.errors import ConfigError
from moe_lora.routing.router import Router

CASES = {
    "soft": dict(top_k=None, num_null=0, shared_A=False),
    "top2": dict(top_k=2, num_null=0, shared_A=False),
    "null": dict(top_k=3, num_null=2, shared_A=False),
    "shared_A": dict(top_k=None, num_null=0, shared_A=True),
}


@pytest.mark.parametrize("case,grouped", [(c, False) for c in CASES] + [("top2", True), ("null", True)])
def test_vectorised_equals_loop_reference(case: str, grouped: bool) -> None:
    c = CASES[case]
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 8).requires_grad_(False)  # grouped GEMMs need 16-byte rows
    ours = LoRAExperts(
        base,
        rank=4,
        alpha=6.0,
        num_experts=5,
        shared_A=c["shared_A"],
        grouped=grouped,
        router=Router(12, 5, top_k=c["top_k"], num_null=c["num_null"]),
    )
    assert ours.grouped == grouped
    with torch.no_grad():
        ours.lora_B.normal_()
    ref = LoopMoELoRA.from_ours(ours)
    x = torch.randn(2, 7, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = ours(x), ref(x_ref)
    assert torch.allclose(out, out_ref, atol=1e-5)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    r = 4
    grad_A = torch.cat([lin.weight.grad.T for lin in ref.experts_A], dim=1)
    grad_B = torch.cat([lin.weight.grad.T for lin in ref.experts_B], dim=0)
    assert torch.allclose(ours.lora_A.grad, grad_A, atol=1e-5)
    assert torch.allclose(ours.lora_B.grad, grad_B, atol=1e-5)
    assert torch.allclose(ours.router.weight.grad, ref.router.weight.grad, atol=1e-5)
    assert grad_A.shape == (12, r if c["shared_A"] else 5 * r)


def test_bench_runs_and_writes_ratios(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    code = bench_main(
        [
            "--hidden",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--ffn",
            "64",
            "--vocab",
            "50",
            "--seq",
            "8",
            "--batch",
            "2",
            "--rounds",
            "2",
            "--out",
            str(out),
            "--variants",
            "lora,loramoe,loramoe_no_telemetry,mola,mola_grouped,loop_loramoe",
        ]
    )
    assert code == 0
    res = json.loads(out.read_text())
    assert set(res["ratio_vs_peft_lora"]) == {"lora", "loramoe", "mola", "mola_grouped"}
    assert res["loop_reference_over_ours"].keys() == {"loramoe"}
    assert res["grouped_over_dense"].keys() == {"mola"}
    assert res["telemetry_overhead"] > 0 and all(v > 0 for v in res["memory_mb"].values())
    flops = res["flop_ratio_vs_peft_lora"]
    assert flops["lora"] == pytest.approx(1.0) and flops["mola"] > flops["mola_grouped"] > 1.0  # top-2 of 8
    assert flops["loramoe"] == pytest.approx(flops["mola"], rel=0.01)  # dense top-k: every expert computed
    assert "loop reference / ours" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="exists"):  # an earlier result is never replaced silently
        bench_main(["--out", str(out)])


def test_bench_sizes() -> None:
    assert parse([]).hidden == 256 and parse(["--size", "0.5b"]).vocab == 151936
    assert parse(["--size", "0.5b", "--hidden", "64"]).hidden == 64  # a flag overrides the size's field
    cpu = parse(["--device", "cpu"])
    assert cpu.large == "none"  # the large shape runs by default on a GPU only
    big = large_args(parse(["--device", "cpu", "--large", "7b"]))
    assert (big.hidden, big.layers, big.dtype, big.seq) == (4096, 32, "bfloat16", 512)


def test_loop_reference_follows_the_layer_dtype() -> None:
    """bfloat16 experts, float32 router, as in the large-shape GPU run of the benchmark."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8, bias=False).to(torch.bfloat16).requires_grad_(False)
    ours = LoRAExperts(base, rank=4, alpha=8.0, num_experts=4, router=Router(16, 4, top_k=2))
    with torch.no_grad():
        ours.lora_B.normal_()
    ref = LoopMoELoRA.from_ours(ours)
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    assert ref.experts_A[0].weight.dtype == torch.bfloat16 and ref.router.weight.dtype == torch.float32
    assert torch.allclose(ours(x).float(), ref(x).float(), atol=0.1)


def test_grouped_top_k_may_exceed_the_real_experts() -> None:
    """AdaMoE-style top-4 over 2 real + 4 null experts: the grouped path equals the dense one."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8).requires_grad_(False)
    layers = [
        LoRAExperts(base, rank=4, alpha=8.0, num_experts=2, grouped=g, router=Router(16, 2, top_k=4, num_null=4))
        for g in (False, True)
    ]
    layers[1].load_state_dict(layers[0].state_dict())
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.copy_(torch.linspace(-1, 1, layer.lora_B.numel()).view_as(layer.lora_B))
    x = torch.randn(2, 5, 16)
    dense, grouped = (layer(x) for layer in layers)
    assert torch.allclose(dense, grouped, atol=1e-6)
