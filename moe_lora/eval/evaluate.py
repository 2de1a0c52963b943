"""Evaluate a model on the mixture's evaluation sets."""

from __future__ import annotations

from collections import defaultdict

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moe_lora.data.mixture import Mixture
from moe_lora.eval.metrics import greedy_em, teacher_forced


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def evaluate(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, mixture: Mixture, *, fast_em: bool,
    limit: int | None = None, max_length: int = 64,
) -> dict[str, float | dict | None]:
    """CBQA exact match and candidate accuracy on held-out people; instruction EM per sub-task.

    ``fast_em`` (built-in world only) uses the teacher-forced exact match; otherwise greedy
    generation with lm-eval normalisation.
    """
    cbqa = mixture.eval["cbqa"][:limit]
    by_task: dict[str, list] = defaultdict(list)
    for e in mixture.eval["instruction"]:
        if limit is None or len(by_task[e.subtask]) < limit:
            by_task[e.subtask].append(e)
    instr = [e for es in by_task.values() for e in es]
    em_c, cand = teacher_forced(model, tok, cbqa, max_length)  # candidate accuracy needs this pass anyway
    if fast_em:
        em_i, _ = teacher_forced(model, tok, instr, max_length)
    else:
        em_c, em_i = greedy_em(model, tok, cbqa), greedy_em(model, tok, instr, exact=True)
    per_task = defaultdict(list)
    for e, ok in zip(instr, em_i, strict=False):
        per_task[e.subtask].append(ok)
    return {
        "cbqa_em": _mean(em_c),
        "cbqa_candidate_acc": _mean(cand),
        "instruction_em": _mean(em_i),
        "instruction_em_by_task": {t: _mean(v) for t, v in per_task.items()},
        "n_cbqa": len(cbqa),
        "n_instruction": len(instr),
    }
