"""ALoRA's final ranks per layer: where reallocation moved the rank budget.

Read from ``results.json["adapter_report"]["alora_ranks"]`` (active components per adapted linear
at the end of training). One small table per arm: a row per layer, a column per kind of linear,
the mean over seeds, and the layer total, so a reader sees at once whether rank flowed towards
some layers or some linears while the budget (the grand total) stayed fixed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from moe_lora.report.collect import Run

_LAYER = re.compile(r"\.(\d+)\.")


def final_ranks(runs: list[Run], names: dict[Path, str]) -> dict[str, dict[str, float]]:
    """Report row label -> adapted linear -> active rank, mean over the label's seeds."""
    acc: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        ranks = ((run.results or {}).get("adapter_report") or {}).get("alora_ranks")
        for module, rank in (ranks or {}).items():
            acc[names.get(run.path, run.label)][module].append(rank)
    return {label: {m: sum(v) / len(v) for m, v in mods.items()} for label, mods in acc.items()}


def _split(module: str) -> tuple[int | None, str]:
    """(layer index, the linear's name within its layer); no index: (None, the whole name)."""
    m = _LAYER.search(module)
    return (int(m.group(1)), module[m.end() :]) if m else (None, module)


def _short(kinds: list[str]) -> dict[str, str]:
    """``self_attn.q_proj`` -> ``q_proj`` unless two kinds share a last part (GPT-2's ``attn.c_proj``
    and ``mlp.c_proj``)."""
    last = [k.rsplit(".", 1)[-1] for k in kinds]
    return {k: s if last.count(s) == 1 else k for k, s in zip(kinds, last, strict=True)}


def _num(x: float) -> str:
    return f"{round(x, 2):g}"


def markdown(ranks: dict[str, dict[str, float]]) -> str:
    """One table per arm: layers down, linears across, layer totals at the right."""
    parts = []
    for label, modules in ranks.items():
        grid: dict[int | None, dict[str, float]] = defaultdict(dict)
        for module, rank in modules.items():
            layer, kind = _split(module)
            grid[layer][kind] = rank
        kinds = sorted({k for row in grid.values() for k in row})
        short = _short(kinds)
        lines = [
            f"**{label}** ({_num(sum(modules.values()))} active components in all)",
            "",
            "| layer | " + " | ".join(short[k] for k in kinds) + " | total |",
            "|" + "---|" * (len(kinds) + 2),
        ]
        for layer in sorted(grid, key=lambda x: (x is None, x or 0)):
            row = grid[layer]
            cells = [_num(row[k]) if k in row else "-" for k in kinds]
            lines.append(
                f"| {'-' if layer is None else layer} | " + " | ".join(cells) + f" | {_num(sum(row.values()))} |"
            )
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
