"""The two-level bootstrap of a claim on a per-item metric: seeds *and* evaluation items resampled,
so the interval speaks about other questions as well as other seeds (``moe-lora report --items``).

Per-item metrics are exact-match macro means over sets (``metrics.cbqa_em``,
``metrics.instruction_em``, ``metrics.cbqa_em_by_set.<set>``); their items are the tuned model's
rows of ``predictions.jsonl``. Both arms of a seed pair answered the same items (the evaluation sets
follow the seed), so items are resampled once per pair and shared by the two arms.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from moe_lora import outputs
from moe_lora.report.collect import Run, Unreadable, read_rows

log = logging.getLogger(__name__)

PER_ITEM = ("metrics.cbqa_em", "metrics.instruction_em", "metrics.cbqa_em_by_set.")


def _sets(results: dict[str, Any], metric: str, tasks: set[str]) -> list[str]:
    """The evaluation sets a per-item metric averages over, in the run's own order."""
    cbqa = list((results.get("metrics") or {}).get("cbqa_em_by_set") or {})
    if metric == "metrics.cbqa_em":
        return cbqa
    if metric.startswith("metrics.cbqa_em_by_set."):
        return [metric.removeprefix("metrics.cbqa_em_by_set.")]
    return sorted(tasks - set(cbqa))  # instruction EM: every scored set that is not CBQA


def item_table(run: Run, metric: str) -> dict[str, dict[str, bool]] | None:
    """set -> item id -> correct, for the sets ``metric`` averages over (None without readable
    predictions)."""
    path = Path(run.path) / outputs.PREDICTIONS
    if not path.exists():
        return None
    try:
        rows = read_rows(path)
    except Unreadable as exc:  # the claim keeps its seed-level interval
        log.warning("no item-level interval: unreadable %s", exc)
        return None
    table: dict[str, dict[str, bool]] = {}
    for row in rows:
        if row.get("model") == "tuned":
            table.setdefault(row["task"], {})[str(row["id"])] = bool(row["correct"])
    keep = _sets(run.results or {}, metric, set(table))
    return {s: table[s] for s in keep if s in table} or None


def _aligned(a: dict[str, dict[str, bool]], b: dict[str, dict[str, bool]], sign: float):
    """Per set, (arm correct, other correct) over the ids both answered, as float arrays."""
    out = []
    for s in a.keys() & b.keys():
        ids = sorted(a[s].keys() & b[s].keys())
        if ids:
            out.append((np.array([a[s][i] for i in ids], float), np.array([b[s][i] for i in ids], float), sign))
    return out


def two_level_interval(
    metric: str, better: str, pairs: list[tuple[int, Run, Run]], bootstrap: int, seed: int = 0
) -> tuple[float, float] | None:
    """95% percentile interval of mean(d) resampling seed pairs, then items within each pair;
    None when the metric is not per-item or a run lacks its predictions."""
    if not metric.startswith(PER_ITEM) or len(pairs) < 2:
        return None
    sign = 1.0 if better == "higher" else -1.0
    per_pair = []
    for _, ra, rb in pairs:
        ta, tb = item_table(ra, metric), item_table(rb, metric)
        if ta is None or tb is None:
            return None
        per_pair.append(_aligned(ta, tb, sign))
    rng = np.random.default_rng(seed)
    means = np.empty(bootstrap)
    for b in range(bootstrap):
        picked = rng.integers(0, len(per_pair), len(per_pair))
        ds = []
        for k in picked:
            diffs = []
            for xa, xb, sgn in per_pair[k]:
                idx = rng.integers(0, len(xa), len(xa))
                diffs.append(sgn * (xa[idx].mean() - xb[idx].mean()))
            ds.append(np.mean(diffs))
        means[b] = np.mean(ds)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)
