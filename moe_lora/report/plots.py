"""PNG plots for the report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from moe_lora.report.collect import Run

_LAYER = re.compile(r"\.(\d+)\.")


def cv_over_training(runs: list[Run], path: Path, names: dict[Path, str]) -> bool:
    """Mean CV of expert importance over adapted linears, per step, one line per label (mean over
    seeds): LoRAMoE's figure, constrained versus unconstrained."""
    series: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        per_step: dict[int, list[float]] = defaultdict(list)
        for row in run.routing:
            if row["task_type"] == "all":
                per_step[row["step"]].append(row["cv"])
        for step, cvs in per_step.items():
            series[names.get(run.path, run.label)][step].append(sum(cvs) / len(cvs))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, steps in series.items():
        xs = sorted(steps)
        ax.plot(xs, [np.mean(steps[s]) for s in xs], label=label)
    ax.set(xlabel="step", ylabel="CV of expert importance (mean over layers)", title="Expert balance over training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def load_heatmap(runs: list[Run], label: str, path: Path, names: dict[Path, str]) -> bool:
    """Expert load share (layer x expert), one panel per task type, averaged over the linears of a
    layer and over seeds; empty cells where a layer has fewer experts (MoLA layouts)."""
    acc: dict[str, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.results is None or names.get(run.path) != label:
            continue
        for module, stats in run.results.get("routing", {}).items():
            m = _LAYER.search(module)
            for task, s in stats.get("by_task_type", {}).items():
                load = np.asarray(s["load"], dtype=float)
                if m and load.sum() > 0:
                    acc[task][int(m.group(1))].append(load / load.sum())
    if not acc:
        return False
    tasks = sorted(acc)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        layers = sorted(acc[task])
        width = max(len(v) for vs in acc[task].values() for v in vs)
        grid = np.full((len(layers), width), np.nan)
        for i, layer in enumerate(layers):
            loads = acc[task][layer]
            if len({len(v) for v in loads}) == 1:
                grid[i, : len(loads[0])] = np.mean(loads, axis=0)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
        ax.set(title=f"{label}: {task} tokens", xlabel="expert", ylabel="layer", yticks=range(len(layers)),
               yticklabels=layers)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def knowledge_vs_instruction(rows: list[dict], path: Path) -> bool:
    """Knowledge retained against instruction accuracy, mean +- std over seeds."""
    pts = [r for r in rows if r["knowledge retained"] and r["instruction EM"]]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for r in pts:
        (x, dx), (y, dy) = r["instruction EM"], r["knowledge retained"]
        ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="o", capsize=3, label=r["label"])
    ax.set(xlabel="instruction exact match", ylabel="knowledge retained (CBQA EM / base)",
           title="Forgetting versus instruction learning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def metric_bars(rows: list[dict], path: Path, title: str) -> bool:
    """Grouped bars of the main metrics per row (the layout comparison)."""
    if len(rows) < 2:
        return False
    metrics = ["CBQA EM", "knowledge retained", "instruction EM"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 4))
    for i, m in enumerate(metrics):
        vals = [r[m][0] if r[m] else 0 for r in rows]
        errs = [r[m][1] if r[m] else 0 for r in rows]
        ax.bar(x + (i - 1) * 0.27, vals, 0.27, yerr=errs, capsize=2, label=m)
    ax.set_xticks(x, [r["label"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set(title=title, ylim=(0, 1.05))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
