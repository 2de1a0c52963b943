"""torch.compile traces every adapter variant, routing recorder on, as one graph: no graph breaks.

The variants come from the registry (the benchmark's own default list), so a new variant is
traced without editing this file; what to expect of each is read from its model and config."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from moe_lora.adapters.inject import aux_config
from moe_lora.bench.run import adapted_variants, adapter_config, build, make_batch, parse
from moe_lora.routing.router import Router
from tests.conftest import first_fast

VARIANTS = adapted_variants()


def test_every_adapting_variant_is_traced() -> None:
    from moe_lora.adapters import ADAPTERS

    assert set(VARIANTS) == {n for n in ADAPTERS if n not in ("full", "none")}


@pytest.mark.parametrize("variant", first_fast(VARIANTS))
def test_no_graph_breaks(variant: str) -> None:
    a = parse(
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
        ]
    )
    case, batch = build(variant, a), make_batch(a)

    def loss(ids: torch.Tensor) -> torch.Tensor:
        return case.model(input_ids=ids, labels=ids).loss

    dynamo.reset()
    with case.recorder.batch(batch["attention_mask"], batch["task_type"]):
        explained = dynamo.explain(loss)(batch["input_ids"])
    routed = any(isinstance(m, Router) for m in case.model.modules())
    assert bool(case.recorder.flush(1)) == routed  # the routers reported from inside the traced graph
    cfg = adapter_config(variant, a)
    aux = aux_config(cfg)
    has_aux = aux.lbc_beta > 0 or aux.z_loss_weight > 0 or (aux.lb_weight > 0 and getattr(cfg, "top_k", None))
    assert (case.recorder.pop_aux_loss() is not None) == bool(has_aux)  # e.g. LoRAMoE's LBC, AdaMoE's balance
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
