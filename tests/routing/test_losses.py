"""Auxiliary losses and statistics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lora.routing import losses
from moe_lora.routing.router import route

# 2 samples x 2 tokens x 2 experts; sample 1's second token is padding.
PROBS = torch.tensor([[[0.8, 0.2], [0.6, 0.4]], [[0.3, 0.7], [0.5, 0.5]]])
MASK = torch.tensor([[1, 1], [1, 0]])


def test_importance_per_sample_masks_padding() -> None:
    q = losses.importance_per_sample(PROBS, MASK)
    assert torch.allclose(q, torch.tensor([[1.4, 0.3], [0.6, 0.7]]))


def test_lbc_loss_hand_computed() -> None:
    # Z = [[1.4*1.5, 0.3*0.5], [0.6*0.5, 0.7*1.5]] = [[2.1, 0.15], [0.3, 1.05]]
    # mean 0.9, unbiased var 2.385/3 = 0.795, loss = 0.795 / 0.81
    loss = losses.lbc_loss(PROBS, MASK, torch.tensor([0, 1]), torch.tensor([0, 1]), delta=0.5)
    assert loss.item() == pytest.approx(0.795 / 0.81, rel=1e-6)


def test_lbc_loss_delta_zero_is_cv_squared_of_importance() -> None:
    q = losses.importance_per_sample(PROBS, MASK).flatten()
    loss = losses.lbc_loss(PROBS, MASK, torch.tensor([0, 1]), torch.tensor([0, 1]), delta=0.0)
    assert loss.item() == pytest.approx((q.std() / q.mean()).item() ** 2, rel=1e-6)


def test_coefficient_of_variation() -> None:
    cv = losses.coefficient_of_variation(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert cv.item() == pytest.approx(math.sqrt(5 / 3) / 2.5, rel=1e-6)


def test_load_balance_loss_uniform_and_collapsed() -> None:
    mask = torch.ones(1, 2)
    probs = torch.tensor([[[0.7, 0.3], [0.4, 0.6]]])
    sel = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert losses.load_balance_loss(probs, sel, mask, k=1).item() == pytest.approx(1.0)
    probs = torch.tensor([[[0.7, 0.3], [0.6, 0.4]]])
    sel = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert losses.load_balance_loss(probs, sel, mask, k=1).item() == pytest.approx(2 * 0.65)


def test_null_load_balance_averages_null_experts() -> None:
    mask = torch.ones(1, 2)
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.5, 0.1, 0.4]]])
    sel = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]])
    # f = [1, .5, .5] / 2 ; P = [.5, .2, .3] ; null experts (1 of them) unchanged with num_null=1
    assert losses.null_load_balance_loss(probs, sel, mask, 2, 1).item() == pytest.approx(
        losses.load_balance_loss(probs, sel, mask, 2).item()
    )
    # two null experts: f_null = mean(.25, .25) ; P_null = mean(.2, .3) = .25
    expected = 3 * (0.5 * 0.5 + 2 * 0.25 * 0.25)
    assert losses.null_load_balance_loss(probs, sel, mask, 2, 2).item() == pytest.approx(expected)


def test_z_loss() -> None:
    logits = torch.zeros(1, 2, 2)
    logits[0, 1] = torch.tensor([100.0, 0.0])  # masked out below
    assert losses.z_loss(logits, torch.tensor([[1, 0]])).item() == pytest.approx(math.log(2) ** 2, rel=1e-6)


def test_entropy() -> None:
    assert losses.entropy(torch.tensor([0.5, 0.5, 0.0])).item() == pytest.approx(math.log(2))


def test_route_topk_renormalises_real_experts_and_null_only_token_gets_zero() -> None:
    probs = torch.tensor([[0.5, 0.1, 0.4], [0.1, 0.1, 0.8], [0.3, 0.5, 0.2]])
    gate, sel = route(probs, top_k=2, num_real=2)
    assert torch.allclose(gate[0], torch.tensor([1.0, 0.0]))  # expert 0 + the null expert
    assert torch.allclose(gate[2], torch.tensor([0.3, 0.5]) / 0.8)
    gate1, _ = route(probs, top_k=1, num_real=2)
    assert torch.equal(gate1[1], torch.zeros(2))  # picked only the null expert: no update
    assert sel.sum(-1).tolist() == [2, 2, 2]


def test_route_soft_is_identity() -> None:
    gate, sel = route(PROBS, None, 2)
    assert sel is None and torch.equal(gate, PROBS)
