"""No host synchronisation in an expert layer's forward or backward, nor in the recorder's
per-micro-batch work (auxiliary losses, statistics): every device-to-host read is trapped. The
statistics are read at logging steps only (``flush``). The loop reference, which calls
``.tolist()`` as released research code does, shows that the trap works."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from moe_lora.adapters.layer import LoRAExperts
from moe_lora.bench.reference import LoopMoELoRA
from moe_lora.routing.recorder import AuxLossConfig, RoutingRecorder
from moe_lora.routing.router import Router

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextmanager
def no_host_reads() -> Iterator[None]:
    def trap(name: str):
        def read(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name}")

        return read

    saved = {name: getattr(torch.Tensor, name) for name in READS}
    try:
        for name in READS:
            setattr(torch.Tensor, name, trap(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


CASES = {
    "soft": dict(top_k=None, num_null=0, shared_A=False, grouped=False),
    "top2": dict(top_k=2, num_null=0, shared_A=False, grouped=False),
    "null": dict(top_k=3, num_null=2, shared_A=False, grouped=False),
    "shared_A": dict(top_k=None, num_null=0, shared_A=True, grouped=False),
    "grouped": dict(top_k=2, num_null=2, shared_A=False, grouped=True),
}


def make_layer(c: dict) -> tuple[LoRAExperts, RoutingRecorder]:
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8).requires_grad_(False)
    layer = LoRAExperts(
        base,
        rank=4,
        alpha=8.0,
        num_experts=4,
        shared_A=c["shared_A"],
        grouped=c["grouped"],
        router=Router(16, 4, top_k=c["top_k"], num_null=c["num_null"]),
    )
    layer.drop_null = False  # a GPU's path: null picks kept at weight 0 (the CPU drops them with one read)
    layer.kernel = "grouped_mm"  # a GPU's kernel (the CPU's CSR kernels build their pattern on the host)
    recorder = RoutingRecorder()
    aux = AuxLossConfig(lbc_beta=0.1, lbc_delta=0.1, lb_weight=0.01, z_loss_weight=1e-3)
    recorder.attach(layer.router, "layer", aux)
    return layer, recorder


@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_and_recorder_never_read_the_device(case: str) -> None:
    layer, recorder = make_layer(CASES[case])
    x = torch.randn(3, 5, 16, requires_grad=True)
    mask, task = torch.ones(3, 5, dtype=torch.long), torch.tensor([0, 1, 0])
    with no_host_reads():
        for _ in range(2):  # statistics accumulate over micro-batches on the device
            with recorder.batch(mask, task):
                out = layer(x)
            (out.square().mean() + recorder.pop_aux_loss()).backward()
    rows = recorder.flush(step=1)  # the one read, at a logging step
    assert rows and layer.lora_A.grad is not None and layer.router.weight.grad is not None


def test_the_trap_catches_the_loop_reference() -> None:
    ref = LoopMoELoRA.from_ours(make_layer(CASES["top2"])[0])
    with no_host_reads(), pytest.raises(AssertionError, match="host sync"):
        ref(torch.randn(3, 5, 16))
