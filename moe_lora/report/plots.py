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
from moe_lora.report.routing_stats import (
    Series,
    has_expert_groups,
    has_null_experts,
    is_top_k,
    knowledge_share,
    over_training,
)
from moe_lora.report.telemetry import layer_indices

_LAYER = re.compile(r"\.(\d+)\.")


def _line_panels(series: Series, path: Path, ylabel: str, title: str, ref: float | None = None) -> bool:
    """One panel per task type (``all`` first), one line per report label; ``ref`` draws a
    dotted guide (e.g. 0.5: no split between expert groups)."""
    tasks = sorted({t for by_task in series.values() for t in by_task}, key=lambda t: (t != "all", t))
    if not tasks:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks, strict=True):
        for label, by_task in series.items():
            if task in by_task:
                xs = sorted(by_task[task])
                ax.plot(xs, [by_task[task][s] for s in xs], label=label)
        if ref is not None:
            ax.axhline(ref, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="step", title=f"{task} tokens" if task != "all" else "all tokens")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def cv_over_training(runs: list[Run], path: Path, names: dict[Path, str]) -> bool:
    """Mean CV of expert importance over adapted linears, per step, one line per label (mean over
    seeds): LoRAMoE's figure, constrained versus unconstrained."""
    series = over_training(runs, names, lambda row: row.get("cv") if row["task_type"] == "all" else None)
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, by_task in series.items():
        xs = sorted(by_task["all"])
        ax.plot(xs, [by_task["all"][s] for s in xs], label=label)
    ax.set(xlabel="step", ylabel="CV of expert importance (mean over layers)", title="Expert balance over training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def group_share_over_training(runs: list[Run], path: Path, names: dict[Path, str]) -> bool:
    """LoRAMoE's split as it forms: each task type's share of router mass on the world-knowledge
    group, per step (mean over layers, then seeds), LoRAMoE arms only. Whether the constraint
    sends CBQA and instruction tokens to different groups shows here long before the final
    window."""
    series = over_training(
        runs, names, lambda row: knowledge_share(row) if row["task_type"] != "all" else None, keep=has_expert_groups
    )
    return _line_panels(
        series,
        path,
        "share of router mass on the knowledge group",
        "Expert-group share by task type over training",
        ref=0.5,
    )


def real_experts_over_training(runs: list[Run], path: Path, names: dict[Path, str]) -> bool:
    """AdaMoE's saving as it forms: real (non-null) experts per token, per step (mean over layers,
    then seeds), for top-k arms; drawn only when some arm has null experts, since otherwise every
    line is flat at k."""
    if not any(r.results and has_null_experts(r.results) for r in runs):
        return False
    series = over_training(runs, names, lambda row: row.get("real_experts_per_token"), keep=is_top_k)
    return _line_panels(
        series, path, "real experts per token (mean over layers)", "Real experts per token over training"
    )


def load_heatmap(runs: list[Run], label: str, path: Path, names: dict[Path, str]) -> bool:
    """Expert load share (layer x expert), one panel per task type, averaged over the linears of a
    layer and over seeds; empty cells where a layer has fewer experts (MoLA layouts)."""
    acc: dict[str, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.results is None or names.get(run.path) != label:
            continue
        routing = run.results.get("routing", {})
        index = layer_indices(routing)
        for module, stats in routing.items():
            for task, s in stats.get("by_task_type", {}).items():
                load = np.asarray(s["load"], dtype=float)
                if module in index and load.sum() > 0:
                    acc[task][index[module]].append(load / load.sum())
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
        ax.set(
            title=f"{label}: {task} tokens",
            xlabel="expert",
            ylabel="layer",
            yticks=range(len(layers)),
            yticklabels=layers,
        )
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
    ax.set(
        xlabel="instruction exact match",
        ylabel="knowledge retained (CBQA EM / base)",
        title="Forgetting versus instruction learning",
    )
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
