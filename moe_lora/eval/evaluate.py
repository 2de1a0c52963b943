"""Evaluate a model on a mixture's evaluation sets: metrics plus one prediction record per scored
example (the runner writes them to ``predictions.jsonl``, like lm-eval's ``--log_samples``).

Each :class:`~moe_lora.data.example.EvalSet` says how it is scored: ``teacher_forced`` (the world:
one forward pass, or greedy generation when ``fast_em`` is off), ``generate`` (greedy generation
cut at the set's stop strings, matched by its lm-eval rules) or ``response_loss`` (held-out
instruction data of real sources; these write no prediction records: there is no prediction).
CBQA numbers are macro means over sets, so a large set does not drown a small one.

Data parallel, a ``shard`` (``train.distributed.Dist``) gives each rank the examples ``rank,
rank + ranks, ...`` of every set; records and loss sums are gathered, so every rank returns the
metrics and records of the whole set, in order.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, ContextManager, Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moe_lora.config import EvalConfig
from moe_lora.data.example import EvalSet, Example, Mixture
from moe_lora.eval.metrics import answers, generated_em, response_loss_sums, teacher_forced


class Shard(Protocol):
    """What evaluation needs of data parallelism (``train.distributed.Dist``)."""

    def shard(self, n: int) -> range: ...

    def gather(self, obj: Any) -> list[Any]: ...

    def unshard(self, parts: list[list[Any]]) -> list[Any]: ...


def _mean(xs: Sequence[float | bool | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


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


def _records(name: str, examples: Sequence[Example], preds: Sequence[str], correct: Sequence[bool]) -> list[dict]:
    return [{"task": name, "id": e.id, "prompt": e.prompt, "prediction": p, "answers": answers(e), "correct": bool(c)}
            for e, p, c in zip(examples, preds, correct, strict=True)]


def score_set(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, eval_set: EvalSet, examples: list[Example], *,
    fast_em: bool, max_length: int, eval_cfg: EvalConfig, chat_template: bool, progress: bool,
    with_candidates: bool,
) -> tuple[list[bool], list[bool | None], list[dict]]:
    """(correct, candidate choice correct, records) of one exact-match set (or a shard of it;
    ``with_candidates``: the whole set has candidate answers)."""
    candidate: list[bool | None] = []
    if not examples:
        return [], [], []
    if eval_set.metric == "teacher_forced" and (fast_em or with_candidates):
        tf = teacher_forced(model, tok, examples, max_length, eval_cfg.batch_size, chat_template)
        candidate = tf.candidate
        if fast_em:
            return tf.em, candidate, _records(eval_set.name, examples, tf.prediction, tf.em)
    preds, correct = generated_em(
        model, tok, examples, match=eval_set.match, stop=eval_set.stop, max_new_tokens=eval_cfg.max_new_tokens,
        batch_size=eval_cfg.batch_size, chat_template=chat_template, progress=progress)
    return correct, candidate, _records(eval_set.name, examples, preds, correct)


def evaluate(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, mixture: Mixture, *, fast_em: bool, limit: int | None,
    max_length: int, eval_cfg: EvalConfig, chat_template: bool = False,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext, progress: bool = False,
    shard: Shard | None = None,
) -> tuple[dict[str, Any], list[dict]]:
    """(metrics, prediction records) over every set of ``mixture.eval``, ``limit`` examples each.

    ``fast_em`` scores ``teacher_forced`` sets in one pass (exact for the world's tokenizer);
    without it they are generated like ``generate`` sets, and candidate accuracy still comes from
    a teacher-forced pass. Records carry no ``model`` key: the runner adds base/tuned.
    """
    em_by_set: dict[str, float | None] = {}
    by_task: dict[str, list[bool]] = defaultdict(list)
    loss_by_set: dict[str, float | None] = {}
    candidates: list[bool | None] = []
    records: list[dict] = []
    counts = {"cbqa": 0, "instruction": 0}
    with autocast():
        for eval_set in mixture.eval.values():
            examples = capped(eval_set, limit)
            counts[eval_set.task_type] += len(examples)
            mine = examples if shard is None else [examples[i] for i in shard.shard(len(examples))]
            if eval_set.metric == "response_loss":
                sums = response_loss_sums(model, tok, mine, max_length, eval_cfg.batch_size, chat_template)
                total, count = map(sum, zip(*(shard.gather(sums) if shard else [sums]), strict=True))
                loss_by_set[eval_set.name] = total / count if count else None
                continue
            scored = score_set(model, tok, eval_set, mine, fast_em=fast_em, max_length=max_length, eval_cfg=eval_cfg,
                               chat_template=chat_template, progress=progress,
                               with_candidates=any(e.candidates for e in examples))
            if shard is not None:
                parts = shard.gather(scored)
                scored = tuple(shard.unshard([p[i] for p in parts]) for i in range(3))
            correct, cand, recs = scored
            em_by_set[eval_set.name] = _mean(correct)
            records += recs
            if eval_set.task_type == "cbqa":
                candidates += cand
            else:
                for e, ok in zip(examples, correct, strict=True):
                    by_task[e.subtask].append(ok)
    return summarise(mixture.eval, em_by_set, by_task, loss_by_set, candidates, counts), records


def summarise(
    sets: dict[str, EvalSet], em_by_set: dict[str, float | None], by_task: dict[str, list[bool]],
    loss_by_set: dict[str, float | None], candidates: list[bool | None], counts: dict[str, int],
) -> dict[str, Any]:
    """The metrics dict: per-set numbers and their macro means (None where nothing was scored)."""
    cbqa = {n: v for n, v in em_by_set.items() if sets[n].task_type == "cbqa"}
    instruction = [v for n, v in em_by_set.items() if sets[n].task_type == "instruction"]
    return {
        "cbqa_em": _mean(list(cbqa.values())),
        "cbqa_em_by_set": cbqa,
        "cbqa_candidate_acc": _mean(candidates),
        "instruction_em": _mean(instruction),
        "instruction_em_by_task": {t: _mean(v) for t, v in by_task.items()},
        "response_loss": _mean(list(loss_by_set.values())),
        "response_loss_by_source": loss_by_set,
        "n_cbqa": counts["cbqa"],
        "n_instruction": counts["instruction"],
    }


def _ratio(tuned: float | None, base: float | None) -> float | None:
    return tuned / base if tuned is not None and base else None


def knowledge_retained(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
    """Tuned over base CBQA exact match, overall and per set; None where the base scored zero or
    a set is missing (a ratio over zero says nothing about forgetting)."""
    by_set = {n: _ratio(tuned.get("cbqa_em_by_set", {}).get(n), b) for n, b in base.get("cbqa_em_by_set", {}).items()}
    return {"overall": _ratio(tuned.get("cbqa_em"), base.get("cbqa_em")), "by_set": by_set}
