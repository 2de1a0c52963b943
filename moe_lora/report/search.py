"""Layouts compared or searched: every run's allocation (results.json ``budget``) against what it
cost and scored. ``search.md`` lists the runs (slope, curvature, budget, experts per layer,
trainable parameters, knowledge retained, instruction EM) and marks the Pareto set (knowledge and
instruction up, trainable parameters down); ``pareto.png`` and ``allocation_heatmap.png`` draw them.
Written for any report whose runs hold at least two different allocations (a layout sweep, an
Optuna search); read from result files only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from moe_lora.report.collect import Run

TOP = 12  # rows of the heatmap: the best runs by instruction EM, then every named layout


@dataclass(frozen=True)
class Point:
    name: str
    layout: str
    experts: tuple[int, ...]
    trainable: int
    knowledge: float | None
    instruction: float | None
    slope: float | None
    curvature: float | None
    budget: float | None


def points(runs: list[Run]) -> list[Point]:
    out = []
    for run in runs:
        r = run.results
        experts = (r or {}).get("budget", {}).get("experts_per_layer") if r else None
        if not experts:
            continue
        layout = (r.get("config") or {}).get("layout") or {}
        m = r.get("metrics", {})
        out.append(
            Point(
                run.path.name,
                str(r.get("layout")),
                tuple(experts),
                int(r["params"]["trainable"]),
                m.get("knowledge_retained"),
                m.get("instruction_em"),
                layout.get("slope"),
                layout.get("curvature"),
                (layout.get("budget") or {}).get("per_layer_mean"),
            )
        )
    return out


def _dominates(a: Point, b: Point) -> bool:
    ka, kb = (
        (a.knowledge or 0.0, a.instruction or 0.0, -a.trainable),
        (b.knowledge or 0.0, b.instruction or 0.0, -b.trainable),
    )
    return all(x >= y for x, y in zip(ka, kb, strict=True)) and ka != kb


def pareto_set(pts: list[Point]) -> list[Point]:
    """The points no other point beats on knowledge, instruction and trainable parameters at once."""
    return [p for p in pts if not any(_dominates(q, p) for q in pts)]


def is_comparison(pts: list[Point]) -> bool:
    return len({p.experts for p in pts}) >= 2


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(pts: list[Point]) -> str:
    front = set(pareto_set(pts))
    rows = sorted(pts, key=lambda p: -(p.instruction or 0.0))
    lines = [
        "| run | layout | slope | curvature | experts/layer (mean) | experts per layer | trainable | "
        "knowledge retained | instruction EM | Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in rows:
        lines.append(
            f"| {p.name} | {p.layout} | {_f(p.slope, 2)} | {_f(p.curvature, 2)} | "
            f"{sum(p.experts) / len(p.experts):g} | {','.join(map(str, p.experts))} | {p.trainable:,} | "
            f"{_f(p.knowledge)} | {_f(p.instruction)} | {'yes' if p in front else ''} |"
        )
    return (
        "Every run's allocation and what it cost and scored; the Pareto set: no other run has more "
        "knowledge retained, more instruction EM and fewer trainable parameters at once.\n\n" + "\n".join(lines) + "\n"
    )


def pareto_plot(pts: list[Point], path: Path) -> bool:
    usable = [p for p in pts if p.knowledge is not None and p.instruction is not None]
    if len(usable) < 2 or len({p.trainable for p in usable}) < 2:  # one budget: no cost axis to draw
        return False
    front = sorted((p for p in pareto_set(usable)), key=lambda p: p.trainable)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sc = ax.scatter(
        [p.trainable for p in usable],
        [p.knowledge for p in usable],
        c=[p.instruction for p in usable],
        cmap="viridis",
        s=40,
        edgecolors="k",
        linewidths=0.5,
    )
    ax.plot([p.trainable for p in front], [p.knowledge for p in front], "r--", lw=1, label="Pareto set")
    for p in usable:
        if p.layout != "searched":
            ax.annotate(p.layout, (p.trainable, p.knowledge), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fig.colorbar(sc, ax=ax, label="instruction EM")
    ax.set(xlabel="trainable parameters", ylabel="knowledge retained", title="Layouts: cost against knowledge")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def allocation_heatmap(pts: list[Point], path: Path) -> bool:
    """Rows: the best runs by instruction EM and every named layout; columns: layers."""
    ranked = sorted(pts, key=lambda p: -(p.instruction or 0.0))
    rows = ranked[:TOP] + [p for p in ranked[TOP:] if p.layout != "searched"]
    if not rows or len({len(p.experts) for p in rows}) != 1:
        return False
    fig, ax = plt.subplots(figsize=(4.5 + 0.5 * len(rows[0].experts), 1.2 + 0.3 * len(rows)))
    im = ax.imshow([list(p.experts) for p in rows], aspect="auto", cmap="magma")
    ax.set_yticks(range(len(rows)), [f"{p.name}: EM {_f(p.instruction)}" for p in rows], fontsize=7)
    ax.set_xticks(range(len(rows[0].experts)))
    ax.set(xlabel="layer", title="Experts per layer")
    fig.colorbar(im, ax=ax, label="experts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
