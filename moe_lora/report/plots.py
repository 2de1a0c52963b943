"""PNG plots for the report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import re
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

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
INLINE_LEGEND = (4, 28)  # at most this many entries of at most this many characters sit inside an axes


def _subplots(rows: int, cols: int, size: tuple[float, float], **kw):
    """A figure whose layout engine fits titles, tick labels, colour bars and legends (constrained
    layout: no clipped labels, no tight_layout warnings)."""
    return plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained", **kw)


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _legend(fig, ax, outside: bool = False) -> None:
    """The axes' legend: inside it when short, else (or when ``outside``) one legend below the
    figure (long row labels, many rows); none when nothing is labelled."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if not outside and len(labels) <= INLINE_LEGEND[0] and max(map(len, labels)) <= INLINE_LEGEND[1]:
        ax.legend(fontsize=8)
    else:
        fig.legend(
            handles, labels, loc="outside lower center", ncols=1 if max(map(len, labels)) > 40 else 2, fontsize=8
        )


def _line_panels(series: Series, path: Path, ylabel: str, title: str, ref: float | None = None) -> bool:
    """One panel per task type (``all`` first), one line per report label; ``ref`` draws a
    dotted guide (e.g. 0.5: no split between expert groups)."""
    tasks = sorted({t for by_task in series.values() for t in by_task}, key=lambda t: (t != "all", t))
    if not tasks:
        return False
    fig, axes = _subplots(1, len(tasks), (5 * len(tasks), 4), sharey=True)
    for ax, task in zip(axes[0], tasks, strict=True):
        for label, by_task in series.items():
            if task in by_task:
                xs = sorted(by_task[task])
                ax.plot(xs, [by_task[task][s] for s in xs], label=label)
        if ref is not None:
            ax.axhline(ref, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="step", title=f"{task} tokens" if task != "all" else "all tokens")
    _legend(fig, axes[0][0])
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    _save(fig, path)
    return True


def cv_over_training(runs: list[Run], path: Path, names: dict[Path, str]) -> bool:
    """Mean CV of expert importance over adapted linears, per step, one line per label (mean over
    seeds): LoRAMoE's figure, constrained versus unconstrained."""
    series = over_training(runs, names, lambda row: row.get("cv") if row["task_type"] == "all" else None)
    if not series:
        return False
    fig, axes = _subplots(1, 1, (6, 4))
    ax = axes[0][0]
    for label, by_task in series.items():
        xs = sorted(by_task["all"])
        ax.plot(xs, [by_task["all"][s] for s in xs], label=label)
    ax.set(xlabel="step", ylabel="CV of expert importance (mean over layers)", title="Expert balance over training")
    _legend(fig, ax)
    _save(fig, path)
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
    depth = max(len(layers) for layers in acc.values())
    fig, axes = _subplots(1, len(tasks), (4 * len(tasks), max(3.5, 1.5 + 0.22 * depth)))
    for ax, task in zip(axes[0], tasks, strict=True):
        layers = sorted(acc[task])
        width = max(len(v) for vs in acc[task].values() for v in vs)
        grid = np.full((len(layers), width), np.nan)
        for i, layer in enumerate(layers):
            loads = acc[task][layer]
            if len({len(v) for v in loads}) == 1:
                grid[i, : len(loads[0])] = np.mean(loads, axis=0)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
        every = max(1, len(layers) // 16)  # at most ~16 layer labels: deep models stay readable
        ax.set(title=f"{task} tokens", xlabel="expert", ylabel="layer")
        ax.set_yticks(range(0, len(layers), every), layers[::every])
        ax.set_xticks(range(0, width, max(1, width // 16)))
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(textwrap.fill(f"Expert load share: {label}", int(8 * fig.get_figwidth())), fontsize=10)
    _save(fig, path)
    return True


def knowledge_vs_instruction(rows: list[dict], path: Path) -> bool:
    """Knowledge retained against instruction accuracy, mean +- std over seeds."""
    pts = [r for r in rows if r.get("knowledge retained") and r.get("instruction EM")]
    if not pts:
        return False
    fig, axes = _subplots(1, 1, (5.5, 4.5))
    ax = axes[0][0]
    for r in pts:
        (x, dx), (y, dy) = r["instruction EM"], r["knowledge retained"]
        ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="o", capsize=3, label=r["label"])
    ax.set(
        xlabel="instruction exact match",
        ylabel="knowledge retained (CBQA EM / base)",
        title="Forgetting versus instruction learning",
    )
    _legend(fig, ax)
    _save(fig, path)
    return True


def metric_bars(rows: list[dict], path: Path, title: str) -> bool:
    """Grouped bars of the main metric columns per row, error bars one std over seeds; rows on the
    y axis so that long labels stay readable."""
    if len(rows) < 2:
        return False
    metrics = [h for h in rows[0]["columns"] if h != "wall s" and any(r.get(h) for r in rows)][:4]
    if not metrics:
        return False
    y = np.arange(len(rows))
    bar = 0.8 / len(metrics)
    fig, axes = _subplots(1, 1, (7, 1.5 + 0.25 * len(rows) * len(metrics)))
    ax = axes[0][0]
    for i, m in enumerate(metrics):
        vals = [r[m][0] if r.get(m) else np.nan for r in rows]
        errs = [r[m][1] if r.get(m) else 0.0 for r in rows]
        ax.barh(y + (i - (len(metrics) - 1) / 2) * bar, vals, bar, xerr=errs, capsize=2, label=m)
    ax.set_yticks(y, [r["label"] for r in rows], fontsize=8)
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set(title=title, xlabel="mean over seeds (bars: ± std)")
    _legend(fig, ax, outside=True)
    _save(fig, path)
    return True


def loss_curves(bands: dict[str, dict[str, dict[int, tuple[float, float, float]]]], path: Path) -> bool:
    """Training loss and, where runs recorded it, validation loss against the step: one colour per
    row, the mean over seeds as a line and their min-max as a band."""
    kinds = [k for k in ("train", "validation") if bands.get(k)]
    if not kinds:
        return False
    fig, axes = _subplots(1, len(kinds), (5.5 * len(kinds), 4), sharex=True)
    labels = list(dict.fromkeys(label for k in kinds for label in bands[k]))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for ax, kind in zip(axes[0], kinds, strict=True):
        for label, by_step in bands[kind].items():
            xs = sorted(by_step)
            mean, lo, hi = (np.array([by_step[s][i] for s in xs]) for i in range(3))
            if len(xs) == 1:  # one point (a validation loss at the end): its range as an error bar
                ax.errorbar(
                    xs, mean, yerr=[mean - lo, hi - mean], fmt="o", capsize=3, color=colours[label], label=label
                )
                continue
            ax.plot(xs, mean, color=colours[label], label=label)
            if (hi > lo).any():
                ax.fill_between(xs, lo, hi, color=colours[label], alpha=0.2, linewidth=0)
        ax.set(xlabel="step", ylabel=f"{kind} loss", title=f"{kind.capitalize()} loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(fig, axes[0][0])
    spread = any(v[2] > v[1] for by_label in bands.values() for b in by_label.values() for v in b.values())
    fig.suptitle(
        "Loss over training " + ("(line: mean over seeds; band: min to max)" if spread else "(one seed per row)"),
        fontsize=10,
    )
    _save(fig, path)
    return True


def scores_vs_steps(
    series: dict[str, dict[int, dict[str, tuple[float, float]]]], metrics: list[str], path: Path
) -> bool:
    """Each metric against ``recipe.max_steps``: one line per arm (its label without the steps),
    error bars one std over seeds."""
    metrics = [m for m in metrics if any(m in v for by_steps in series.values() for v in by_steps.values())][:4]
    if not metrics or all(len(by_steps) < 2 for by_steps in series.values()):
        return False
    fig, axes = _subplots(1, len(metrics), (4.5 * len(metrics), 3.8))
    for ax, m in zip(axes[0], metrics, strict=True):
        for label, by_steps in series.items():
            xs = sorted(s for s in by_steps if m in by_steps[s])
            if xs:
                ax.errorbar(
                    xs,
                    [by_steps[s][m][0] for s in xs],
                    yerr=[by_steps[s][m][1] for s in xs],
                    marker="o",
                    capsize=3,
                    label=label,
                )
        ax.set(xlabel="training steps (recipe.max_steps)", title=m)
    _legend(fig, axes[0][0])
    _save(fig, path)
    return True
