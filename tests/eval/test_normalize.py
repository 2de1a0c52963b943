"""Answer matching agrees with lm-eval's own filter and metric, case by case, for each task's YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moe_lora.eval.normalize import MATCHERS, NQ_OPEN_REGEXES, match_exact, match_nq_open, match_triviaqa

# (generation after the stop cut, accepted answers); every rule the two tasks differ on or share.
CASES = [
    ("Paris", ["Paris"]),
    (" Paris ", ["Paris"]),  # remove_whitespace filter
    ("paris", ["PARIS"]),  # case
    ("Paris!", ["Paris"]),  # punctuation
    ("U.S.A", ["USA"]),
    ("Eiffel-Tower", ["Eiffel Tower"]),  # punctuation is deleted, not replaced by a space
    ("eiffel  tower", ["Eiffel Tower"]),  # inner white space is not squeezed
    ("The Beatles", ["Beatles"]),  # articles: nq_open drops them, triviaqa keeps them
    ("the beatles", ["Beatles"]),
    ("Beatles", ["The Beatles"]),
    ("an apple", ["apple"]),
    ("An apple", ["apple"]),
    ("THE BEATLES", ["Beatles"]),  # nq_open's regex runs before lower-casing: upper case escapes it
    ("Plan A is", ["Plan is"]),  # ... and it matches "A " anywhere after a word boundary
    ("theatre", ["atre"]),  # "the" without a space is no article
    ("Melville", ["Herman Melville", "Melville"]),  # aliases: any target
    ("Herman Melville", ["Melville"]),
    ("Moby Dick", ["Herman Melville", "Melville"]),
    ("", ["Paris"]),
    ("", [""]),
    ("1,889", ["1889"]),
    ("l'Arc", ["LArc"]),
    ("café", ["Cafe"]),  # no accent folding
]
TASK_YAML = {"triviaqa": "triviaqa/default.yaml", "nq_open": "nq_open/nq_open.yaml"}


def lm_eval_scores(task: str) -> list[bool]:
    """lm-eval's verdict on CASES: the task YAML's filters and exact_match kwargs, read from the
    installed package, and ``process_results``' any-target rule."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import WhitespaceFilter

    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / TASK_YAML[task]).read_text())
    assert [f["function"] for f in config["filter_list"][0]["filter"]] == ["remove_whitespace", "take_first"]
    metric = config["metric_list"][0]
    kwargs = {k: v for k, v in metric.items() if k not in ("metric", "aggregation", "higher_is_better")}
    assert metric["metric"] == "exact_match"
    out = []
    for pred, answers in CASES:
        filtered = WhitespaceFilter().apply([[pred]], [{}])[0][0]
        score = exact_match_hf_evaluate(predictions=[filtered] * len(answers), references=answers, **kwargs)
        out.append(float(score["exact_match"]) > 0)
    return out


@pytest.mark.parametrize("task", ["triviaqa", "nq_open"])
def test_matching_agrees_with_lm_eval_case_by_case(task: str) -> None:
    expected = lm_eval_scores(task)
    ours = [MATCHERS[task](pred, answers) for pred, answers in CASES]
    assert [c for c, a, b in zip(CASES, ours, expected, strict=True) if a != b] == []


def test_nq_open_regex_is_lm_eval_verbatim() -> None:
    lm_eval = pytest.importorskip("lm_eval")
    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / TASK_YAML["nq_open"]).read_text())
    assert tuple(config["metric_list"][0]["regexes_to_ignore"]) == NQ_OPEN_REGEXES


def test_rules_differ_where_the_tasks_do() -> None:
    """Pinned verdicts, so the rules are checked even without lm-eval installed."""
    assert match_nq_open("The Beatles", ["Beatles"]) and not match_triviaqa("The Beatles", ["Beatles"])
    assert match_triviaqa(" u.s.a! ", ["USA"]) and match_nq_open(" u.s.a! ", ["USA"])
    assert not match_triviaqa("eiffel  tower", ["Eiffel Tower"])
    assert match_triviaqa("Melville", ["Herman Melville", "Melville"])
    assert match_exact(" b a ", ["b a"]) and not match_exact("B a", ["b a"]) and not match_exact("b  a", ["b a"])
    assert set(MATCHERS) == {"triviaqa", "nq_open", "exact", "contains"}  # contains: tests/test_real_weights.py
