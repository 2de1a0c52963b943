"""Evaluate a model on a mixture's evaluation sets: metrics plus one prediction record per scored
example (the runner writes them to ``predictions.jsonl``, like lm-eval's ``--log_samples``).

Each :class:`~moe_lora.data.example.EvalSet` names its metric kind (``eval/kinds/``: one file each,
``teacher_forced``, ``generate``, ``response_loss``); the kinds' declared columns turn the per-set
scores into the metrics dict. CBQA numbers are macro means over sets, so a large set does not drown
a small one.

Data parallel, a ``shard`` (``train.distributed.Dist``) gives each rank the examples ``rank,
rank + ranks, ...`` of every set; records and loss sums are gathered, so every rank returns the
metrics and records of the whole set, in order.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any, ContextManager

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moe_lora.config import EvalConfig
from moe_lora.data.example import EvalSet, Example, Mixture
from moe_lora.eval.kinds import COLUMNS, KINDS, Scoring, SetScore, summarise
from moe_lora.eval.kinds.base import Shard, ratio


def capped(eval_set: EvalSet, limit: int | None) -> list[Example]:
    """The first ``limit`` examples; instruction sets keep up to ``limit`` per sub-task, so every
    world task stays represented in smoke runs (a source's sub-task is the source itself)."""
    if limit is None:
        return list(eval_set.examples)
    if eval_set.task_type != "instruction":
        return list(eval_set.examples[:limit])
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for e in eval_set.examples:
        if seen[e.subtask] < limit:
            seen[e.subtask] += 1
            kept.append(e)
    return kept


def evaluate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    mixture: Mixture,
    *,
    fast_em: bool,
    limit: int | None,
    max_length: int | tuple[int, int],
    eval_cfg: EvalConfig,
    chat_template: bool = False,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    progress: bool = False,
    shard: Shard | None = None,
) -> tuple[dict[str, Any], list[dict]]:
    """(metrics, prediction records) over every set of ``mixture.eval``, ``limit`` examples each,
    each set scored by the metric kind it names (``eval/kinds/``).

    ``fast_em`` scores ``teacher_forced`` sets in one pass (exact for the world's tokenizer) and
    generates only the wrong examples, so every record's prediction is still the greedy output;
    without it they are generated like ``generate`` sets, and candidate accuracy still comes from
    a teacher-forced pass. Records carry no ``model`` key: the runner adds base/tuned.
    """
    scoring = Scoring(model, tok, eval_cfg, max_length, chat_template, fast_em, progress, shard)
    scored: list[tuple[EvalSet, list[Example], SetScore]] = []
    with autocast():
        for eval_set in mixture.eval.values():
            examples = capped(eval_set, limit)
            scored.append((eval_set, examples, KINDS.get(eval_set.metric).score(scoring, eval_set, examples)))
    return summarise(scored), [r for *_, result in scored for r in result.records]


def knowledge_retained(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
    """Tuned over base CBQA exact match, overall and per set (the ``knowledge_retained`` column)."""
    out = ratio(COLUMNS["knowledge_retained"], base, tuned)
    return {"overall": out["knowledge_retained"], "by_set": out["knowledge_retained_by_set"]}
