"""Teacher-forced exact match equals greedy decoding + matching on the world; evaluate()'s metrics
and prediction records; response loss; knowledge retained."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch

from moe_lora.config import EvalConfig
from moe_lora.data.collate import collate
from moe_lora.data.example import EvalSet, Mixture
from moe_lora.eval.evaluate import capped, evaluate, knowledge_retained
from moe_lora.eval.metrics import generated_em, response_loss, teacher_forced
from moe_lora.recipes.compose import load_config
from moe_lora.world.generator import World
from moe_lora.world.mixture import world_mixture
from moe_lora.world.model import world_model
from tests.conftest import TINY

EVAL = EvalConfig(max_new_tokens=8, batch_size=16)


@pytest.fixture(scope="module")
def trained(cache_dir):
    cfg = load_config([*TINY, f"cache_dir={cache_dir}"])
    world = World(cfg.data.world)
    model, tok = world_model(cfg.model, world, cfg.cache_dir, progress=False)
    return model, tok, world_mixture(cfg.data, world, 0), world


def test_teacher_forced_em_equals_greedy_decoding(trained) -> None:
    model, tok, mix, world = trained
    examples = world.qa("train") + world.qa("test") + mix.eval["instruction"].examples
    fast = teacher_forced(model, tok, examples)
    preds, slow = [], []
    for task_type, match in (("cbqa", "nq_open"), ("instruction", "exact")):  # batched == one by one: test_generate
        p, ok = generated_em(
            model,
            tok,
            [e for e in examples if e.task_type == task_type],
            match=match,
            stop=("\n",),
            max_new_tokens=8,
            batch_size=16,
        )
        preds, slow = preds + p, slow + ok
    assert fast.em == slow
    assert 0 < sum(fast.em) < len(fast.em)  # a partly trained model: both outcomes are exercised
    # where correct, the teacher-forced prediction is the greedy output
    assert all(f == g.strip() for f, g, ok in zip(fast.prediction, preds, fast.em, strict=True) if ok)


def test_candidate_accuracy_is_at_least_exact_match(trained) -> None:
    model, tok, _, world = trained
    tf = teacher_forced(model, tok, world.qa("train"))
    assert all(c is not None for c in tf.candidate)
    assert all(c for e, c in zip(tf.em, tf.candidate, strict=True) if e)  # a correct answer is also the top candidate


def test_evaluate_fast_and_generated_agree_and_records_match_metrics(trained) -> None:
    model, tok, mix, _ = trained
    entered = []

    @contextlib.contextmanager
    def autocast():
        entered.append(1)
        yield

    fast, fast_records = evaluate(
        model, tok, mix, fast_em=True, limit=4, max_length=64, eval_cfg=EVAL, autocast=autocast
    )
    slow, slow_records = evaluate(model, tok, mix, fast_em=False, limit=4, max_length=64, eval_cfg=EVAL)
    assert entered == [1]
    for key in (
        "cbqa_em",
        "cbqa_em_by_set",
        "cbqa_candidate_acc",
        "instruction_em",
        "instruction_em_by_task",
        "n_cbqa",
        "n_instruction",
    ):
        assert fast[key] == slow[key], key
    tasks = {e.subtask for e in mix.eval["instruction"].examples}
    assert fast["n_cbqa"] == 4 and fast["n_instruction"] == 4 * len(tasks)  # instruction: limit per sub-task
    assert set(fast["instruction_em_by_task"]) == tasks
    assert fast["response_loss"] is None and fast["response_loss_by_source"] == {}
    cbqa = [r for r in fast_records if r["task"] == "cbqa"]
    assert fast["cbqa_em"] == fast["cbqa_em_by_set"]["cbqa"] == sum(r["correct"] for r in cbqa) / len(cbqa)
    assert len(fast_records) == len(slow_records) == fast["n_cbqa"] + fast["n_instruction"]
    assert set(fast_records[0]) == {"task", "id", "prompt", "prediction", "answers", "correct"}
    assert [r["id"] for r in fast_records] == [r["id"] for r in slow_records] and cbqa[0]["id"] == "cbqa-0"
    # every prediction is the greedy output: teacher-forced tokens where right, generated where wrong
    assert [(r["correct"], r["prediction"]) for r in fast_records] == [
        (r["correct"], r["prediction"]) for r in slow_records
    ]
    assert not all(r["correct"] for r in fast_records)


def test_generate_sets_and_response_loss_sets(trained) -> None:
    model, tok, mix, _ = trained
    cbqa, instr = mix.eval["cbqa"].examples[:6], mix.eval["instruction"].examples[:5]
    sets = {
        "gen": EvalSet("gen", "cbqa", cbqa, metric="generate", match="nq_open", stop=("\n",)),
        "tf": EvalSet("tf", "cbqa", cbqa[:3], metric="teacher_forced", match="nq_open"),
        "held_out": EvalSet("held_out", "instruction", instr, metric="response_loss"),
    }
    metrics, records = evaluate(
        model, tok, Mixture([], sets, []), fast_em=True, limit=None, max_length=64, eval_cfg=replace(EVAL, batch_size=2)
    )
    assert metrics["cbqa_em"] == pytest.approx((metrics["cbqa_em_by_set"]["gen"] + metrics["cbqa_em_by_set"]["tf"]) / 2)
    assert metrics["instruction_em"] is None and metrics["instruction_em_by_task"] == {}
    assert {r["task"] for r in records} == {"gen", "tf"}  # response-loss sets write no predictions
    batch = collate(instr, tok, 64)
    with torch.no_grad():  # one batch: HF's mean over label tokens is the token-weighted mean
        expected = float(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        )
    assert metrics["response_loss"] == metrics["response_loss_by_source"]["held_out"] == pytest.approx(expected, 1e-5)
    assert response_loss(model, tok, [], 64, 2) is None
    assert metrics["n_cbqa"] == 9 and metrics["n_instruction"] == 5


def test_capped_keeps_limit_per_instruction_subtask(trained) -> None:
    _, _, mix, _ = trained
    kept = capped(mix.eval["instruction"], 2)
    assert {t: sum(e.subtask == t for e in kept) for t in {e.subtask for e in kept}} == {
        "reverse": 2,
        "sort": 2,
        "upper": 2,
    }
    assert capped(mix.eval["cbqa"], 3) == mix.eval["cbqa"].examples[:3]


def test_knowledge_retained_is_tuned_over_base_per_set() -> None:
    base = {"cbqa_em": 0.5, "cbqa_em_by_set": {"triviaqa": 0.6, "nq_open": 0.4, "webq": 0.0}}
    tuned = {"cbqa_em": 0.25, "cbqa_em_by_set": {"triviaqa": 0.3, "nq_open": 0.2, "webq": 0.1}}
    assert knowledge_retained(base, tuned) == {
        "overall": 0.5,
        "by_set": {"triviaqa": 0.5, "nq_open": 0.5, "webq": None},
    }
    assert knowledge_retained({"cbqa_em": None, "cbqa_em_by_set": {}}, tuned) == {"overall": None, "by_set": {}}
