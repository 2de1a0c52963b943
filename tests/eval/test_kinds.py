"""The metric-kind registry: a kind registered in one place is scored by the evaluator, lands in
results.json with its base twin and reaches the report's columns; the shipped declarations keep
the keys the runner and the report always had."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_lora.config import EvalConfig
from moe_lora.data.example import EvalSet, Example, Mixture
from moe_lora.errors import ConfigError
from moe_lora.eval.evaluate import evaluate
from moe_lora.eval.kinds import COLUMNS, KINDS, Column, MetricKind, SetScore, compare
from moe_lora.eval.kinds.base import declarations, register_column, register_kind
from moe_lora.report.collect import Run
from moe_lora.report.tables import aggregate, markdown


@pytest.fixture
def answer_length():
    """A new metric kind, declared the way a kind file does (then removed again)."""

    def score(s, eval_set, examples):
        lengths = [len(e.answer) for e in s.mine(examples)]
        return SetScore({"answer_chars": sum(lengths) / len(lengths) if lengths else None})

    register_kind(MetricKind("answer_length", score, ("answer_chars",)))
    register_column(
        Column("answer_chars", "answer chars", "answer_chars", "instruction", by="answer_chars_by_set", report=True)
    )
    yield
    del KINDS._items["answer_length"], COLUMNS["answer_chars"]


def _mixture() -> Mixture:
    ex = [Example(f"q{i}", "a" * i, "instruction", "t", id=str(i)) for i in (2, 4)]
    return Mixture([], {"lengths": EvalSet("lengths", "instruction", ex, metric="answer_length")}, [])


def test_a_registered_kind_reaches_evaluator_results_and_report(answer_length, tmp_path: Path) -> None:
    metrics, records = evaluate(None, None, _mixture(), fast_em=False, limit=None, max_length=8, eval_cfg=EvalConfig())
    assert metrics["answer_chars"] == 3.0 and metrics["answer_chars_by_set"] == {"lengths": 3.0}
    assert metrics["n_instruction"] == 2 and metrics["cbqa_em"] is None and records == []
    results = compare(metrics, metrics | {"answer_chars": 5.0})
    assert results["answer_chars_base"] == 3.0 and results["answer_chars"] == 5.0
    run = Run(
        tmp_path,
        {
            "adapter": "arm",
            "seed": 0,
            "params": {"trainable": 1},
            "metrics": results,
            "wall_s": 1.0,
            "routing": {},
            "config": {},
            "metric_columns": declarations(),
        },
    )
    table = markdown(aggregate([run]))
    assert "answer chars" in table.splitlines()[0] and "5.000" in table


def test_unknown_kind_is_one_line_naming_it() -> None:
    bad = Mixture([], {"x": EvalSet("x", "cbqa", [], metric="teacher_forcd")}, [])
    with pytest.raises(ConfigError, match=r"EvalSet\.metric='teacher_forcd'.*did you mean 'teacher_forced'"):
        evaluate(None, None, bad, fast_em=True, limit=None, max_length=8, eval_cfg=EvalConfig())


def test_shipped_columns_keep_the_result_keys() -> None:
    assert list(COLUMNS) == [
        "cbqa_em",
        "cbqa_candidate_acc",
        "knowledge_retained",
        "instruction_em",
        "t0_score",
        "rank_acc_mean",
        "response_loss",
    ]
    assert set(KINDS) == {"teacher_forced", "generate", "response_loss", "rank_classification"}
    keys = set(compare({}, {}))
    assert keys >= {
        "cbqa_em",
        "cbqa_em_base",
        "cbqa_em_by_set",
        "cbqa_em_by_set_base",
        "cbqa_candidate_acc",
        "cbqa_candidate_acc_base",
        "instruction_em",
        "instruction_em_base",
        "instruction_em_by_task",
        "knowledge_retained",
        "knowledge_retained_by_set",
        "response_loss",
        "response_loss_base",
        "response_loss_by_source",
        "response_loss_by_source_base",
        "n_cbqa",
        "n_instruction",
    }
    for c in COLUMNS.values():  # every averaged field is written by some kind
        assert c.ratio_of or any(c.field in KINDS.get(k).fields for k in KINDS), c.key
