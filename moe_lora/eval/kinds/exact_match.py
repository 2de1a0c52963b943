"""Exact match, two ways: ``teacher_forced`` (the world: one forward pass; greedy generation when
``fast_em`` is off) and ``generate`` (greedy generation cut at the set's stop strings, matched by
its lm-eval rules). Both give ``em`` per example, and ``candidate`` (the most likely of the
example's single-token candidate answers is right) where a set has candidates.

Every stored ``prediction`` is the model's greedy output, as ``moe-lora generate`` prints it. With
``fast_em`` a correct example's teacher-forced tokens are that output (every arg-max is the gold
token); a wrong one's are not (each arg-max follows the gold prefix, not the model's own), so the
wrong examples alone are generated, with the set's stop strings and ``eval.max_new_tokens``.
"""

from __future__ import annotations

from moe_lora.data.example import EvalSet, Example
from moe_lora.eval.generate import greedy_generate
from moe_lora.eval.kinds.base import Column, MetricKind, Scoring, SetScore, register_column, register_kind
from moe_lora.eval.metrics import answers, generated_em, teacher_forced


def _records(name: str, examples: list[Example], preds: list[str], correct: list[bool]) -> list[dict]:
    return [
        {"task": name, "id": e.id, "prompt": e.prompt, "prediction": p, "answers": answers(e), "correct": bool(c)}
        for e, p, c in zip(examples, preds, correct, strict=True)
    ]


def _generation(s: Scoring, eval_set: EvalSet) -> dict:
    """How evaluation generates for this set (``moe-lora generate`` uses the same run settings)."""
    return {
        "stop": eval_set.stop,
        "max_new_tokens": s.eval_cfg.max_new_tokens,
        "batch_size": s.eval_cfg.batch_size,
        "chat_template": s.chat_template,
        "progress": s.progress,
        "max_source": s.max_length[0] if isinstance(s.max_length, tuple) else None,
    }


def _score_mine(s: Scoring, eval_set: EvalSet, examples: list[Example], with_candidates: bool):
    """(correct, candidate choice correct, predictions) of this rank's examples."""
    if not examples:
        return [], [], []
    candidate: list[bool | None] = []
    if eval_set.metric == "teacher_forced" and (s.fast_em or with_candidates):
        tf = teacher_forced(s.model, s.tok, examples, s.max_length, s.eval_cfg.batch_size, s.chat_template)
        if s.fast_em:
            return tf.em, tf.candidate, _greedy_where_wrong(s, eval_set, examples, tf.em, tf.prediction)
        candidate = tf.candidate
    preds, correct = generated_em(s.model, s.tok, examples, match=eval_set.match, **_generation(s, eval_set))
    return correct, candidate, preds


def _greedy_where_wrong(
    s: Scoring, eval_set: EvalSet, examples: list[Example], em: list[bool], forced: list[str]
) -> list[str]:
    """The greedy output of every example: the teacher-forced tokens where exact, generated (in
    batches) where not."""
    wrong = [i for i, ok in enumerate(em) if not ok]
    if not wrong:
        return list(forced)
    generated = greedy_generate(s.model, s.tok, [examples[i].prompt for i in wrong], **_generation(s, eval_set))
    preds = list(forced)
    for i, text in zip(wrong, generated, strict=True):
        preds[i] = text
    return preds


def score(s: Scoring, eval_set: EvalSet, examples: list[Example]) -> SetScore:
    correct, candidate, preds = s.unshard(
        *_score_mine(s, eval_set, s.mine(examples), with_candidates=any(e.candidates for e in examples))
    )
    em = sum(correct) / len(correct) if correct else None
    return SetScore(
        {"em": em},
        {"em": list(correct), "candidate": list(candidate)},
        _records(eval_set.name, examples, list(preds), list(correct)),
    )


register_kind(MetricKind("teacher_forced", score, ("em", "candidate")))
register_kind(MetricKind("generate", score, ("em", "candidate")))
register_column(Column("cbqa_em", "CBQA EM", "em", "cbqa", by="cbqa_em_by_set", report=True))
register_column(Column("cbqa_candidate_acc", "CBQA candidate acc", "candidate", "cbqa", over="examples", report=True))
register_column(
    Column("knowledge_retained", "knowledge retained", ratio_of="cbqa_em", by="knowledge_retained_by_set", report=True)
)
register_column(
    Column(
        "instruction_em",
        "instruction EM",
        "em",
        "instruction",
        by="instruction_em_by_task",
        by_subtask=True,
        report=True,
    )
)
