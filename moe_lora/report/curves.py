"""Loss curves from each run's ``metrics.jsonl``: the training loss of every logging window (its
``loss`` lines) and the validation loss where a run recorded one (``val_loss`` or ``eval_loss`` on
a line with a ``step``), per report row: mean over distinct seeds and their min-max band."""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from pathlib import Path

from moe_lora import outputs
from moe_lora.report.collect import Run, Unreadable, read_rows

log = logging.getLogger(__name__)

KINDS = {"train": ("loss",), "validation": ("val_loss", "eval_loss")}  # kind -> keys of a metrics line


def run_losses(run: Run) -> dict[str, dict[int, float]]:
    """Kind -> step -> loss of one run ({} without a readable metrics.jsonl); a later line for a
    step wins (a resumed run's log is cut back to its checkpoint, so there is none in practice)."""
    try:
        rows = read_rows(Path(run.path) / outputs.METRICS)
    except Unreadable as exc:  # the report goes on without this run's curve
        log.warning("no loss curve: unreadable %s", exc)
        return {}
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if not isinstance(row.get("step"), int):
            continue
        for kind, keys in KINDS.items():
            value = next((row[k] for k in keys if isinstance(row.get(k), int | float)), None)
            if value is not None:
                out[kind][row["step"]] = float(value)
    return dict(out)


Band = dict[int, tuple[float, float, float]]  # step -> (mean, min, max) over seeds


def curves(runs: list[Run], names: dict[Path, str]) -> dict[str, dict[str, Band]]:
    """Kind -> row label -> step -> (mean, min, max) over the row's distinct seeds at that step
    (runs repeating a seed averaged first)."""
    per_seed: dict[str, dict[str, dict[int, dict[object, list[float]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    )
    for run in runs:
        if run.results is None or run.path not in names:
            continue
        for kind, by_step in run_losses(run).items():
            for step, value in by_step.items():
                per_seed[kind][names[run.path]][step][run.results.get("seed")].append(value)
    out: dict[str, dict[str, Band]] = {}
    for kind in KINDS:
        for label, by_step in per_seed.get(kind, {}).items():
            for step in sorted(by_step):
                seeds = [statistics.fmean(v) for v in by_step[step].values()]
                out.setdefault(kind, {}).setdefault(label, {})[step] = (statistics.fmean(seeds), min(seeds), max(seeds))
    return out
