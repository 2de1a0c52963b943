"""``rank_classification``: T0's zero-shot multiple choice. Every choice of an example is scored by
the summed log-probability of its tokens plus EOS after the prompt (``eval.rank_length_normalize``:
per token instead), and the example counts as right when the arg-max is its answer. A set is one
dataset whose examples carry their ``template``; the dataset's score is the *median* over its
templates of the per-template accuracy, and ``t0_score`` the mean over datasets, as T0 and the
MoV paper report. Prediction rows gain ``choices``, ``choice_scores`` and ``template``; their
``prediction`` is the chosen answer, so the rows reproduce every accuracy reported.

A causal LM reads the prompt once per choice (one row per pair, lm-eval's way); an encoder-decoder
encodes it once per example and decodes every choice from the same encoder states (T0's way;
``metrics.choice_logprobs``)."""

from __future__ import annotations

import statistics
from collections import defaultdict

from moe_lora.data.example import EvalSet, Example
from moe_lora.eval.kinds.base import Column, MetricKind, Scoring, SetScore, register_column, register_kind
from moe_lora.eval.metrics import choice_logprobs


def template_median(examples: list[Example], correct: list[bool]) -> float | None:
    """The median over templates of the per-template accuracy."""
    by_template: dict[str, list[bool]] = defaultdict(list)
    for e, c in zip(examples, correct, strict=True):
        by_template[e.template].append(c)
    accs = [sum(v) / len(v) for v in by_template.values()]
    return statistics.median(accs) if accs else None


def score(s: Scoring, eval_set: EvalSet, examples: list[Example]) -> SetScore:
    mine = s.mine(examples)
    for e in mine:
        if len(e.choices) < 2 or e.answer not in e.choices:
            raise ValueError(
                f"{eval_set.name} example {e.id!r}: rank classification needs >= 2 choices holding its answer"
            )
    scores = (
        choice_logprobs(
            s.model, s.tok, mine, s.max_length, s.eval_cfg.batch_size, s.chat_template, s.eval_cfg.rank_length_normalize
        )
        if mine
        else []
    )
    (scores,) = s.unshard(scores)
    chosen = [e.choices[max(range(len(sc)), key=sc.__getitem__)] for e, sc in zip(examples, scores, strict=True)]
    correct = [c == e.answer for e, c in zip(examples, chosen, strict=True)]
    records = [
        {
            "task": eval_set.name,
            "id": e.id,
            "template": e.template,
            "prompt": e.prompt,
            "choices": list(e.choices),
            "choice_scores": list(sc),
            "prediction": c,
            "answers": [e.answer],
            "correct": ok,
        }
        for e, sc, c, ok in zip(examples, scores, chosen, correct, strict=True)
    ]
    return SetScore({"rank_median": template_median(examples, correct)}, {"rank": correct}, records)


register_kind(MetricKind("rank_classification", score, ("rank_median", "rank")))
register_column(Column("t0_score", "T0 score", "rank_median", by="rank_acc_by_set", report=True, optional=True))
register_column(
    Column(
        "rank_acc_mean",
        "rank classification acc",
        "rank",
        over="examples",
        by="rank_acc",
        by_template=True,
        optional=True,
    )
)
