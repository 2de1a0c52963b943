"""torch.compile traces every adapter variant, routing recorder on, as one graph: no graph breaks."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from moe_lora.bench.run import build, make_batch, parse

VARIANTS = ["lora", "loramoe", "molora", "mola", "adamoe", "hydralora", "mov", "melora", "alora"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_graph_breaks(variant: str) -> None:
    a = parse(["--hidden", "32", "--layers", "1", "--heads", "2", "--ffn", "64", "--vocab", "50", "--seq", "8",
               "--batch", "2"])
    case, batch = build(variant, a), make_batch(a)

    def loss(ids: torch.Tensor) -> torch.Tensor:
        return case.model(input_ids=ids, labels=ids).loss

    dynamo.reset()
    with case.recorder.batch(batch["attention_mask"], batch["task_type"]):
        explained = dynamo.explain(loss)(batch["input_ids"])
    routed = variant in ("loramoe", "molora", "mola", "adamoe", "hydralora", "mov")
    assert bool(case.recorder.flush(1)) == routed  # the routers reported from inside the traced graph
    if variant in ("loramoe", "adamoe"):  # LBC / AdaMoE's load balance are on by default
        assert case.recorder.pop_aux_loss() is not None
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
