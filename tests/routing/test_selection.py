"""The top-k selection both expert paths share, and the recorder's layout-keeping stack."""

from __future__ import annotations

import pytest
import torch

from moe_lora.routing.recorder import stack_kept
from moe_lora.routing.router import softmax_experts, top_choices


@pytest.mark.parametrize("experts,k", [(8, 1), (8, 2), (16, 1), (16, 2), (64, 2), (6, 4), (3, 3), (20, 4)])
def test_top_choices_are_topk(experts: int, k: int) -> None:
    probs = softmax_experts(torch.randn(4, 33, experts))
    got = top_choices(probs, k).sort(-1).values
    want = probs.topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(got, want)


def test_top_choices_of_max_passes_break_ties_by_the_first_expert() -> None:
    probs = torch.full((5, 16), 1 / 16)  # a router whose logits are all equal
    assert torch.equal(top_choices(probs, 2), torch.tensor([[0, 1]] * 5))


def test_stack_kept_keeps_the_expert_major_layout_and_the_values() -> None:
    views = [softmax_experts(torch.randn(2, 7, 5)) for _ in range(3)]
    assert views[0].stride(-2) == 1  # softmax_experts' transposed view
    stacked = stack_kept(views)
    assert torch.equal(stacked, torch.stack(views)) and stacked.stride(-2) == 1
    plain = [torch.randn(2, 7, 5) for _ in range(3)]
    assert torch.equal(stack_kept(plain), torch.stack(plain))
