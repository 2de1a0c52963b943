"""Teacher-forced exact match equals greedy decoding + lm-eval normalisation on the world."""

from __future__ import annotations

import pytest

from moe_lora.cli import load_config
from moe_lora.data.mixture import world_mixture
from moe_lora.data.world import World
from moe_lora.eval.metrics import greedy_em, teacher_forced
from moe_lora.eval.normalize import exact_match, normalize_answer
from moe_lora.models import world_model
from tests.conftest import TINY


def test_normalisation_follows_lm_eval() -> None:
    assert normalize_answer("  The Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("an Apple a day") == "apple day"
    assert exact_match("the Oslo.", ["Bergen", "oslo"]) and not exact_match("oslo fjord", ["oslo"])


@pytest.fixture(scope="module")
def trained(cache_dir):
    cfg = load_config([*TINY, "model.pretrain.steps=150", f"cache_dir={cache_dir}"])
    world = World(cfg.data.world)
    model, tok = world_model(cfg.model, world, cfg.cache_dir, progress=False)
    return model, tok, world_mixture(cfg.data, world, 0), world


def test_teacher_forced_em_equals_greedy_decoding(trained) -> None:
    model, tok, mix, world = trained
    examples = world.qa("train") + world.qa("test") + mix.eval["instruction"]
    fast, _ = teacher_forced(model, tok, examples)
    slow = [greedy_em(model, tok, [e], exact=e.task_type == "instruction")[0] for e in examples]
    assert fast == slow
    assert 0 < sum(fast) < len(fast)  # a partly trained model: both outcomes are exercised


def test_candidate_accuracy_is_at_least_exact_match(trained) -> None:
    model, tok, _, world = trained
    em, cand = teacher_forced(model, tok, world.qa("train"))
    assert all(c is not None for c in cand)
    assert all(c for e, c in zip(em, cand, strict=False) if e)  # a correct answer is also the top candidate
