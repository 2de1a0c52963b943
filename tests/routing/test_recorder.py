"""The recorder's statistics and aux loss on a hand-made routing tensor."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lora.routing.recorder import AuxLossConfig, RoutingRecorder
from moe_lora.routing.router import Router

PROBS = torch.tensor([[[0.8, 0.2], [0.6, 0.4]], [[0.3, 0.7], [0.5, 0.5]]])
MASK = torch.tensor([[1, 1], [1, 0]])
TASK = torch.tensor([0, 1])  # sample 0 cbqa, sample 1 instruction


def _h(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p)


def test_statistics_per_task_type() -> None:
    rec = RoutingRecorder()
    router = Router(3, 2)
    rec.attach(router, "layers.0.mlp", AuxLossConfig())
    with rec.batch(MASK, TASK):
        rec.record(router, PROBS.log(), PROBS, None)
    rows = {r["task_type"]: r for r in rec.flush(step=7)}
    assert set(rows) == {"cbqa", "instruction", "all"}
    c, i, a = rows["cbqa"], rows["instruction"], rows["all"]
    assert c["step"] == 7 and c["module"] == "layers.0.mlp" and c["tokens"] == 2 and i["tokens"] == 1
    assert c["importance"] == pytest.approx([1.4, 0.6]) and i["importance"] == pytest.approx([0.3, 0.7])
    assert a["importance"] == pytest.approx([1.7, 1.3])
    assert a["cv"] == pytest.approx(math.sqrt(0.08) / 1.5)
    assert c["load"] == [2, 0] and i["load"] == [0, 1]  # soft routing: arg-max expert
    assert c["entropy"] == pytest.approx((_h([0.8, 0.2]) + _h([0.6, 0.4])) / 2)
    assert c["group_share"] == pytest.approx([0.7, 0.3])
    assert c["null_rate"] == 0.0 and c["real_experts_per_token"] == 2.0
    assert rec.flush(step=8) == []  # the window was reset


def test_lbc_aux_loss_recorded_and_popped() -> None:
    rec = RoutingRecorder(statistics=False)
    router = Router(3, 2)
    rec.attach(router, "m", AuxLossConfig(lbc_beta=2.0, lbc_delta=0.5))
    with rec.batch(MASK, TASK):
        rec.record(router, PROBS.log(), PROBS, None)
    assert rec.pop_aux_loss().item() == pytest.approx(2.0 * 0.795 / 0.81, rel=1e-6)
    assert rec.pop_aux_loss() is None


def test_router_reports_only_inside_a_batch() -> None:
    rec = RoutingRecorder()
    router = Router(3, 4, top_k=2, num_null=2)
    rec.attach(router, "m", AuxLossConfig(lb_weight=1.0))
    x = torch.randn(2, 5, 3)
    router(x)  # outside a batch context: nothing recorded
    assert rec.flush(1) == []
    with rec.batch(torch.ones(2, 5), torch.tensor([0, 1])):
        gate = router(x)
    assert gate.shape == (2, 5, 4)
    assert rec.pop_aux_loss() is not None
    row = next(r for r in rec.flush(2) if r["task_type"] == "all")
    assert row["tokens"] == 10 and sum(row["load"]) + row["null_rate"] * 20 == pytest.approx(20)
    assert row["real_experts_per_token"] == pytest.approx(2 - 2 * row["null_rate"])


@pytest.mark.parametrize("loss", ["lbc", "lb", "z"])
def test_each_padding_switch_changes_only_its_own_loss(loss: str) -> None:
    """``lbc_mask_padding`` reaches the LBC only, ``aux_mask_padding`` load balance and z-loss only
    (through inject.aux_config, the way a config switches them)."""
    from moe_lora.adapters.inject import aux_config
    from moe_lora.adapters.variants.loramoe import LoRAMoEConfig

    weights = {
        "lbc": dict(lbc_beta=1.0),
        "lb": dict(lbc_beta=0.0, lb_weight=1.0),
        "z": dict(lbc_beta=0.0, z_loss_weight=1.0),
    }[loss]
    torch.manual_seed(0)
    router, x = Router(3, 4, top_k=2), torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])

    def aux(lbc_mask: bool, aux_mask: bool) -> float:
        cfg = LoRAMoEConfig(num_experts=4, top_k=2, lbc_mask_padding=lbc_mask, aux_mask_padding=aux_mask, **weights)
        rec = RoutingRecorder(statistics=False)
        rec.attach(router, "m", aux_config(cfg))
        with rec.batch(mask, TASK):
            router(x)
        return rec.pop_aux_loss().item()

    masked = aux(True, True)
    own_off, other_off = (aux(False, True), aux(True, False)) if loss == "lbc" else (aux(True, False), aux(False, True))
    assert own_off != pytest.approx(masked, rel=1e-4)  # padding now counts in this loss
    assert other_off == masked  # the other switch leaves it alone
