"""The metric-kind contract: how an evaluation set is scored, and the result keys that come of it.

A **kind** (``EvalSet.metric``) scores one set and returns a :class:`SetScore`: per-set values and
per-example values of named *fields* (``em``, ``candidate``, ``response_loss``...) plus prediction
records. A **column** declares one key of ``results["metrics"]``: which field it averages, over which
task type, how (macro over sets or micro over examples), its breakdown key, its header in the
summary and the report, and whether the report's main table shows it. The evaluator, results.json
and the report read these declarations, so a new kind is one file in this package that calls
:func:`register_kind` (and :func:`register_column` for keys of its own).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from moe_lora.config import TASK_TYPES, EvalConfig
from moe_lora.data.example import EvalSet, Example
from moe_lora.registry import Registry


class Shard(Protocol):
    """What evaluation needs of data parallelism (``train.distributed.Dist``)."""

    def shard(self, n: int) -> range: ...

    def gather(self, obj: Any) -> list[Any]: ...

    def unshard(self, parts: list[list[Any]]) -> list[Any]: ...


@dataclass(frozen=True)
class Scoring:
    """Everything a kind needs besides its set: the model, how to batch and prompt, and the shard."""

    model: Any
    tok: Any
    eval_cfg: EvalConfig
    max_length: int | tuple[int, int]  # data.collate.Lengths: (source, target) for an encoder-decoder
    chat_template: bool = False
    fast_em: bool = False  # teacher-forced sets in one forward pass (exact for the world tokenizer)
    progress: bool = False
    shard: Shard | None = None

    def mine(self, examples: list[Example]) -> list[Example]:
        """This rank's examples of a set (all of them without data parallelism)."""
        return examples if self.shard is None else [examples[i] for i in self.shard.shard(len(examples))]

    def unshard(self, *per_example: list) -> tuple[list, ...]:
        """Per-example lists of every rank, back in the set's order (identity without a shard)."""
        if self.shard is None:
            return per_example
        parts = self.shard.gather(per_example)
        return tuple(self.shard.unshard([p[i] for p in parts]) for i in range(len(per_example)))


@dataclass
class SetScore:
    """One set's result: ``values[field]`` per set, ``per_example[field]`` aligned with the set's
    examples where a column breaks it down by sub-task, and lm-eval-style prediction records."""

    values: dict[str, float | None]
    per_example: dict[str, list] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class MetricKind:
    """``score(scoring, set, examples)`` for every set whose ``metric`` is ``name``; ``fields``: what
    its SetScore holds (a test checks that every declared column averages a field some kind writes)."""

    name: str
    score: Callable[[Scoring, EvalSet, list[Example]], SetScore]
    fields: tuple[str, ...]


@dataclass(frozen=True)
class Column:
    """One key of ``results["metrics"]`` (and ``<key>_base``), declared once.

    ``over="sets"``: the macro mean of the field's per-set values, so a large set does not drown a
    small one; ``"examples"``: the micro mean of its per-example values. ``by``: the breakdown key
    (per set, or per sub-task with ``by_subtask``). ``ratio_of``: tuned over base of another column
    (knowledge retained), computed when base and tuned are compared."""

    key: str
    header: str
    field: str = ""
    task_type: str | None = None  # None: sets of every task type
    over: Literal["sets", "examples"] = "sets"
    by: str | None = None
    by_subtask: bool = False
    by_template: bool = False  # the breakdown per set, then per example template (rank classification)
    ratio_of: str | None = None
    report: bool = False  # a column of the report's main table
    optional: bool = False  # shown only where a run scored it (a kind few runs have)
    higher_is_better: bool = True


KINDS: Registry[MetricKind] = Registry("metric kind", "EvalSet.metric")
COLUMNS: dict[str, Column] = {}  # declaration order is the report's column order


def register_kind(kind: MetricKind) -> MetricKind:
    return KINDS.register(kind.name, kind)


def register_column(column: Column) -> Column:
    if column.key in COLUMNS:
        raise ValueError(f"metric column {column.key!r} is declared twice")
    if column.task_type is not None and column.task_type not in TASK_TYPES:
        raise ValueError(f"metric column {column.key!r}: unknown task type {column.task_type!r}")
    COLUMNS[column.key] = column
    return column


def _mean(xs: Sequence[float | bool | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def aggregate(column: Column, scored: list[tuple[EvalSet, list[Example], SetScore]]) -> dict[str, Any]:
    """The column's key (and breakdown) over the sets that carry its field."""
    mine = [
        (s, ex, r)
        for s, ex, r in scored
        if column.task_type in (None, s.task_type)
        and column.field in (r.values if column.over == "sets" else r.per_example)
    ]
    if column.over == "sets":
        value = _mean([r.values[column.field] for _, _, r in mine])
    else:
        value = _mean([v for _, _, r in mine for v in r.per_example.get(column.field, [])])
    out: dict[str, Any] = {column.key: value}
    if column.by and column.by_subtask:
        groups: dict[str, list] = defaultdict(list)
        for _, examples, r in mine:
            for e, v in zip(examples, r.per_example[column.field], strict=True):
                groups[e.subtask].append(v)
        out[column.by] = {t: _mean(v) for t, v in groups.items()}
    elif column.by and column.by_template:
        nested: dict[str, dict[str, list]] = {}
        for s, examples, r in mine:
            for e, v in zip(examples, r.per_example[column.field], strict=True):
                nested.setdefault(s.name, {}).setdefault(e.template, []).append(v)
        out[column.by] = {n: {t: _mean(v) for t, v in by_t.items()} for n, by_t in nested.items()}
    elif column.by:
        out[column.by] = {s.name: r.values[column.field] for s, _, r in mine}
    return out


def summarise(scored: list[tuple[EvalSet, list[Example], SetScore]]) -> dict[str, Any]:
    """The metrics dict of one model: every declared column (None where nothing was scored) and
    ``n_<task type>``, the examples evaluated per task type."""
    metrics: dict[str, Any] = {}
    for column in COLUMNS.values():
        if column.ratio_of is None:
            metrics |= aggregate(column, scored)
    return metrics | {f"n_{t}": sum(len(ex) for s, ex, _ in scored if s.task_type == t) for t in TASK_TYPES}


def _ratio(tuned: float | None, base: float | None) -> float | None:
    return tuned / base if tuned is not None and base else None


def ratio(column: Column, base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
    """A ``ratio_of`` column: tuned over base, overall and per breakdown entry; None where the base
    scored zero or an entry is missing (a ratio over zero says nothing about forgetting)."""
    of = COLUMNS[column.ratio_of]
    out = {column.key: _ratio(tuned.get(of.key), base.get(of.key))}
    if column.by and of.by:
        out[column.by] = {n: _ratio(tuned.get(of.by, {}).get(n), b) for n, b in base.get(of.by, {}).items()}
    return out


def compare(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
    """``results["metrics"]``: every column of the tuned model beside its ``_base`` twin, ratios of
    the two, and the example counts."""
    metrics: dict[str, Any] = {}
    for column in COLUMNS.values():
        if column.ratio_of is not None:
            metrics |= ratio(column, base, tuned)
            continue
        for key in filter(None, (column.key, column.by)):
            metrics[f"{key}_base"], metrics[key] = base.get(key), tuned.get(key)
    return metrics | {f"n_{t}": tuned.get(f"n_{t}") for t in TASK_TYPES}


def declarations() -> list[dict[str, Any]]:
    """The columns as plain data (``results["metric_columns"]``): the report reads them from the
    result files, so it shows a new kind's keys without importing the evaluator."""
    return [
        {
            "key": c.key,
            "header": c.header,
            "by": c.by,
            "ratio": c.ratio_of is not None,
            "report": c.report,
            "optional": c.optional,
            "higher_is_better": c.higher_is_better,
        }
        for c in COLUMNS.values()
    ]
