"""Rank classification: a choice's score is the summed log-probability of its tokens + EOS (by
hand), the set's score the median over templates, t0_score their mean over sets, and the
prediction rows' per-choice scores reproduce every reported accuracy. On a tiny random Llama
checkpoint loaded through the hub path (tests/fixtures)."""

from __future__ import annotations

import statistics
from collections import defaultdict

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_lora.config import EvalConfig
from moe_lora.data.collate import IGNORE, collate
from moe_lora.data.example import EvalSet, Example, Mixture
from moe_lora.eval.evaluate import evaluate
from moe_lora.eval.metrics import choice_logprobs
from moe_lora.recipes.results import metric_rows

CHOICES = ("yes", "no", "maybe")


@pytest.fixture(scope="module")
def llama(checkpoints):
    path = checkpoints["llama"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _examples(dataset: str, n: int = 6) -> list[Example]:
    templates = ("plain", "question", "polite")
    return [
        Example(
            f"{t}: is {i} even?",
            CHOICES[i % 3],
            "instruction",
            dataset,
            id=f"{dataset}-{t}-{i}",
            choices=CHOICES,
            template=t,
        )
        for t in templates
        for i in range(n)
    ]


def test_choice_scores_are_summed_logprobs_of_choice_and_eos(llama) -> None:
    model, tok = llama
    ex = _examples("d")[:2]
    scores = choice_logprobs(model, tok, ex, 64, batch_size=4)
    normed = choice_logprobs(model, tok, ex, 64, batch_size=1, normalize=True)
    for e, per_choice, per_choice_normed in zip(ex, scores, normed, strict=True):
        for choice, score, score_normed in zip(CHOICES, per_choice, per_choice_normed, strict=True):
            batch = collate([Example(e.prompt, choice, "instruction", "d")], tok, 64)
            with torch.no_grad():
                logp = model(input_ids=batch["input_ids"]).logits[0, :-1].log_softmax(-1)
            labels = batch["labels"][0, 1:]
            positions = (labels != IGNORE).nonzero().flatten()
            assert int(labels[positions[-1]]) == tok.eos_token_id  # the choice's tokens, then EOS
            by_hand = sum(float(logp[p, labels[p]]) for p in positions)
            assert score == pytest.approx(by_hand, abs=1e-4)
            assert score_normed == pytest.approx(by_hand / len(positions), abs=1e-4)


def test_template_medians_t0_score_and_rows_that_reproduce_them(llama) -> None:
    model, tok = llama
    sets = {d: EvalSet(d, "instruction", _examples(d), metric="rank_classification") for d in ("rte", "cb")}
    metrics, rows = evaluate(
        model, tok, Mixture([], sets, []), fast_em=False, limit=None, max_length=64, eval_cfg=EvalConfig(batch_size=5)
    )
    assert len(rows) == 2 * 18 and all(len(r["choice_scores"]) == 3 for r in rows)
    per_template: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        best = r["choices"][max(range(3), key=r["choice_scores"].__getitem__)]
        assert r["prediction"] == best and r["correct"] == (best == r["answers"][0])
        per_template[r["task"]][r["template"]].append(r["correct"])
    accs = {d: {t: sum(v) / len(v) for t, v in by_t.items()} for d, by_t in per_template.items()}
    assert metrics["rank_acc"].keys() == accs.keys()
    assert all(metrics["rank_acc"][d] == pytest.approx(accs[d]) for d in accs)
    medians = {d: statistics.median(by_t.values()) for d, by_t in accs.items()}
    assert metrics["rank_acc_by_set"] == pytest.approx(medians)
    assert metrics["t0_score"] == pytest.approx(sum(medians.values()) / 2)
    assert metrics["rank_acc_mean"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    assert metrics["cbqa_em"] is None  # other kinds' columns stay empty
    flat = dict(metric_rows(metrics))
    assert "  rte/plain" in flat  # the summary prints one row per set and template


def test_an_answer_outside_its_choices_is_refused(llama) -> None:
    model, tok = llama
    bad = [Example("p", "perhaps", "instruction", "d", id="x", choices=CHOICES, template="t")]
    sets = {"d": EvalSet("d", "instruction", bad, metric="rank_classification")}
    with pytest.raises(ValueError, match="needs >= 2 choices holding its answer"):
        evaluate(model, tok, Mixture([], sets, []), fast_em=False, limit=None, max_length=64, eval_cfg=EvalConfig())


def test_the_t0_column_shows_only_where_a_run_scored_it(tmp_path) -> None:
    from moe_lora.eval.kinds.base import declarations
    from moe_lora.report.collect import Run
    from moe_lora.report.tables import metric_columns

    def run(t0: float | None) -> Run:
        return Run(tmp_path, {"metrics": {"t0_score": t0, "cbqa_em": 0.5}, "metric_columns": declarations()})

    assert "t0_score" not in {k for _, k in metric_columns([run(None)])}
    assert "t0_score" in {k for _, k in metric_columns([run(None), run(0.4)])}
    assert "cbqa_em" in {k for _, k in metric_columns([run(None)])}  # shipped columns always show
