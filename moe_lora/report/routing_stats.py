"""Routing statistics as the report needs them, read from results.json and routing.jsonl only.

Every number is a mean over the adapted modules first (each module has its own router, and the
papers report layer averages), then over seeds by the caller. A statistic a run does not have
(no router, no expert groups) is None, which the tables print as "-".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from moe_lora.report.collect import Run

KNOWLEDGE_GROUP = 0  # LoRAMoE's world-knowledge experts: group 0 (the first half, or lbc_expert_types 0)


def adapter_config(results: dict) -> dict:
    """The adapter's settings: ``adapter_config`` (dataclass fields), else the resolved config."""
    return results.get("adapter_config") or results.get("config", {}).get("adapter") or {}


def has_expert_groups(results: dict) -> bool:
    """Only LoRAMoE's schema gives the expert groups a meaning (the LBC's world-knowledge and
    instruction groups); every router reports a two-group split, but elsewhere it is an arbitrary
    first-half / second-half cut that a reader should not see as a result."""
    return "lbc_expert_types" in adapter_config(results)


def has_null_experts(results: dict) -> bool:
    return (adapter_config(results).get("num_null_experts") or 0) > 0


def is_top_k(results: dict) -> bool:
    """Soft routing always uses every expert, so its real experts per token say nothing."""
    return adapter_config(results).get("top_k") is not None


def task_types(runs: list[Run]) -> list[str]:
    """Task types that appear in any run's final routing window, sorted (stable columns)."""
    return sorted(
        {t for r in runs if r.results for m in r.results.get("routing", {}).values() for t in m.get("by_task_type", {})}
    )


def _mean(values: list[float | None]) -> float | None:
    nums = [float(v) for v in values if v is not None]
    return sum(nums) / len(nums) if nums else None


def knowledge_share(stats: dict) -> float | None:
    """Share of the window's router probability mass on the world-knowledge group; the
    instruction group has the rest."""
    share = stats.get("group_share")
    return float(share[KNOWLEDGE_GROUP]) if share else None


def final_stat(results: dict, stat: str, task: str | None = None) -> float | None:
    """A final-window statistic, for all tokens or one task type (the claims' ``routing.<stat>@<task>``),
    averaged over modules."""
    modules = results.get("routing", {}).values()
    windows = [m.get("by_task_type", {}).get(task, {}) if task else m for m in modules]
    return _mean([w.get(stat) for w in windows])


def final_knowledge_share(results: dict, task: str) -> float | None:
    """One task type's knowledge-group share in the final window, averaged over modules; None for
    arms without expert groups."""
    if not has_expert_groups(results):
        return None
    return _mean(
        [knowledge_share(m.get("by_task_type", {}).get(task, {})) for m in results.get("routing", {}).values()]
    )


Series = dict[str, dict[str, dict[int, float]]]  # label -> task type -> step -> mean over modules and seeds


def over_training(
    runs: list[Run],
    names: dict[Path, str],
    value: Callable[[dict], float | None],
    keep: Callable[[dict], bool] = lambda results: True,
) -> Series:
    """A statistic of every routing.jsonl row, averaged over modules per (step, task type) within
    a run, then over the seeds of a label; only runs whose results pass ``keep``."""
    acc: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for run in runs:
        if run.results is None or not keep(run.results):
            continue
        per_step: dict[tuple[str, int], list[float]] = defaultdict(list)
        for row in run.routing:
            v = value(row)
            if v is not None:
                per_step[row["task_type"], row["step"]].append(v)
        for (task, step), vs in per_step.items():
            acc[names.get(run.path, run.label)][task][step].append(sum(vs) / len(vs))
    return {
        label: {task: {s: sum(v) / len(v) for s, v in steps.items()} for task, steps in tasks.items()}
        for label, tasks in acc.items()
    }
