"""Layouts compared or searched: every run's allocation (results.json ``budget``) against what it
cost and scored. ``search.md`` lists the runs (slope, curvature, budget, experts per layer,
trainable parameters, knowledge retained, instruction EM), marks the Pareto set (knowledge and
instruction up, trainable parameters down), gives the hypervolume each method reached, and for the
Optuna studies stored beside the runs (``study.db``) their trials by state and, for single-objective
studies, the parameter importances (a random forest's mean decrease in impurity). ``pareto.png`` and ``allocation_heatmap.png`` draw
them (seeds of one layout averaged, with error bars; the per-layer router statistics of uniform
runs under the heatmap). Written for any report whose runs hold at least two different
allocations (a layout sweep, an Optuna search); read from result files only."""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from moe_lora.errors import first_line
from moe_lora.report.collect import Run
from moe_lora.report.telemetry import ROUTER_RULES, layer_statistics

log = logging.getLogger(__name__)

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
    method: str = ""  # how the layout was chosen: "search (<study folder>)" or the layout's name
    label: str = ""  # the run's report row (variant, layout, the settings that tell it apart)
    seeds: int = 1  # distinct seeds averaged into this point (aggregate)
    runs: int = 1  # runs behind it (a seed run twice counts once in ``seeds``)
    seed: object = None  # a single run's seed
    knowledge_sd: float = 0.0
    instruction_sd: float = 0.0


def is_trial(layout: str) -> bool:
    """A layout search's trial (conf/layout/searched*.yaml), not a named or generated layout."""
    return layout.startswith("searched")


def method_of(run: Run, layout: str) -> str:
    """Trials of a search share their sweep folder; any other layout is its own method."""
    return f"search ({run.path.parent.name})" if is_trial(layout) else layout


def _label(row: str | None, layout: str) -> str:
    """A point's name in the plots: its report row, with the layout where the row does not name it
    (``mola`` runs ``uniform``: ``mola [uniform]``)."""
    if not row:
        return layout
    return row if layout in row else f"{row} [{layout}]"


def points(runs: list[Run], names: dict[Path, str] | None = None) -> list[Point]:
    """One point per run with an allocation; ``names``: the report's row labels (else the layout)."""
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
                method_of(run, str(r.get("layout"))),
                _label((names or {}).get(run.path), str(r.get("layout"))),
                seed=r.get("seed"),
            )
        )
    return out


def _per_seed(pts: list[Point], field: str) -> list[float]:
    """One value of ``field`` per distinct seed (runs of one seed averaged)."""
    by_seed: dict[object, list[float]] = defaultdict(list)
    for p in pts:
        if getattr(p, field) is not None:
            by_seed[p.seed].append(getattr(p, field))
    return [statistics.fmean(v) for v in by_seed.values()]


def aggregate(pts: list[Point]) -> list[Point]:
    """One point per layout (method and allocation): runs of one seed averaged first, then the
    distinct seeds, their standard deviation kept (repeats of a seed are no spread over seeds)."""
    groups: dict[tuple, list[Point]] = defaultdict(list)
    for p in pts:
        groups[(p.method, p.label, p.experts, p.trainable)].append(p)
    out = []
    for same in groups.values():
        if len(same) == 1:
            out.append(same[0])
            continue
        k = _per_seed(same, "knowledge")
        i = _per_seed(same, "instruction")
        out.append(
            replace(
                same[0],
                name=f"{same[0].label} ({len(same)} runs)",
                knowledge=statistics.fmean(k) if k else None,
                instruction=statistics.fmean(i) if i else None,
                seeds=len({p.seed for p in same}),
                runs=len(same),
                knowledge_sd=statistics.stdev(k) if len(k) > 1 else 0.0,
                instruction_sd=statistics.stdev(i) if len(i) > 1 else 0.0,
            )
        )
    return out


def hypervolume(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    """The volume dominated by ``points`` (every coordinate maximised) above ``ref``: exact, by
    slicing along the last coordinate (fine for the tens of points of a search)."""
    pts = [p for p in points if all(x > r for x, r in zip(p, ref, strict=True))]
    if not pts:
        return 0.0
    if len(ref) == 1:
        return max(p[0] for p in pts) - ref[0]
    pts.sort(key=lambda p: -p[-1])
    total = 0.0
    for i, p in enumerate(pts):
        floor = pts[i + 1][-1] if i + 1 < len(pts) else ref[-1]
        if p[-1] > floor:
            total += (p[-1] - floor) * hypervolume([q[:-1] for q in pts[: i + 1]], ref[:-1])
    return total


def objectives(p: Point) -> tuple[float, float, float] | None:
    if p.knowledge is None or p.instruction is None:
        return None
    return (p.knowledge, p.instruction, -float(p.trainable))


def hypervolumes(pts: list[Point]) -> dict[str, float]:
    """Method -> hypervolume of its runs, objectives (knowledge, instruction, -trainable) scaled to
    [0, 1] over all runs of the report (an objective that does not vary is left out) and the
    reference point 0.1 below the worst value of each: comparable between the methods of one report."""
    vals = {id(p): v for p in pts if (v := objectives(p)) is not None}
    if not vals:
        return {}
    cols = list(zip(*vals.values(), strict=True))
    keep = [j for j, c in enumerate(cols) if max(c) > min(c)]
    if not keep:
        return {}

    def scaled(v: tuple[float, ...]) -> tuple[float, ...]:
        return tuple((v[j] - min(cols[j])) / (max(cols[j]) - min(cols[j])) for j in keep)

    by_method: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for p in pts:
        if id(p) in vals:
            by_method[p.method].append(scaled(vals[id(p)]))
    ref = tuple(-0.1 for _ in keep)
    return {m: hypervolume(v, ref) for m, v in sorted(by_method.items())}


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


def markdown(pts: list[Point], studies: list[dict] | None = None) -> str:
    front = set(pareto_set(pts))
    rows = sorted(pts, key=lambda p: -(p.instruction or 0.0))
    lines = [
        "| run | method | slope | curvature | experts/layer (mean) | experts per layer | trainable | "
        "knowledge retained | instruction EM | Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in rows:
        lines.append(
            f"| {p.name} | {p.method} | {_f(p.slope, 2)} | {_f(p.curvature, 2)} | "
            f"{sum(p.experts) / len(p.experts):g} | {','.join(map(str, p.experts))} | {p.trainable:,} | "
            f"{_f(p.knowledge)} | {_f(p.instruction)} | {'yes' if p in front else ''} |"
        )
    text = (
        "Every run's allocation and what it cost and scored; the Pareto set: no other run has more "
        "knowledge retained, more instruction EM and fewer trainable parameters at once.\n\n" + "\n".join(lines) + "\n"
    )
    hv = hypervolumes(pts)
    if hv:
        text += (
            "\n### Hypervolume per method\n\nThe objective space each method's runs dominate: knowledge "
            "retained, instruction EM and fewer trainable parameters, each scaled to [0, 1] over this "
            "report's runs (one that does not vary is left out), reference 0.1 below the worst; larger "
            "is better. A method with more runs has more chances: read it with the run counts.\n\n"
            "| method | runs | hypervolume |\n|---|---|---|\n"
        )
        counts = defaultdict(int)
        for p in pts:
            counts[p.method] += 1
        text += "".join(f"| {m} | {counts[m]} | {v:.3f} |\n" for m, v in sorted(hv.items(), key=lambda kv: -kv[1]))
    for st in studies or []:
        text += study_markdown(st)
    return text


def read_studies(runs: list[Run]) -> list[dict]:
    """The Optuna studies stored beside the runs (``study.db`` in a run's parent folder): name,
    directions, trials by state, and for a single-objective study its best value and the
    parameter importances (scikit-learn needed; None without it or with too few trials)."""
    dbs = sorted({run.path.parent / "study.db" for run in runs if (run.path.parent / "study.db").exists()})
    if not dbs:
        return []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = []
    for db in dbs:
        try:
            out += _study_entries(db, optuna)
        except Exception as exc:  # a damaged or foreign study.db: sqlite's and optuna's errors
            log.warning("left out of the report: %s cannot be read as an Optuna study (%s)", db, first_line(exc, 120))
    return out


def _study_entries(db: Path, optuna) -> list[dict]:
    """One entry per study in one ``study.db``."""
    out = []
    storage = f"sqlite:///{db}"
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        states = defaultdict(int)
        for t in trials:
            states[t.state.name.lower()] += 1
        entry = {
            "name": study.study_name,
            "path": str(db),
            "directions": [d.name.lower() for d in study.directions],
            "states": dict(states),
            "best": None,
            "importances": None,
        }
        if len(study.directions) == 1 and states.get("complete"):
            entry["best"] = {"value": study.best_value, "params": study.best_params}
            entry["importances"] = importances(study)
        out.append(entry)
    return out


def importances(study) -> dict[str, float] | None:
    """Parameter importances of a single-objective study (None: fewer than 4 complete trials, one
    parameter, or no scikit-learn)."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 4 or len({k for t in complete for k in t.params}) < 2:
        return None
    # optuna 2.x's fANOVA fails on today's numpy (an array of sequences); the mean decrease in
    # impurity of a random forest over the same trials is optuna's other built-in evaluator
    evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except ImportError:
        return None


def study_markdown(st: dict) -> str:
    states = ", ".join(f"{n} {k}" for k, n in sorted(st["states"].items()))
    text = f"\n### Study `{st['name']}`\n\n`{st['path']}`: {', '.join(st['directions'])}; trials: {states}.\n"
    if st["best"]:
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in st["best"]["params"].items()
        )
        text += f"\nBest value {st['best']['value']:.3f} at {params}.\n"
    if st["importances"]:
        text += (
            "\nParameter importances (a random forest's mean decrease in impurity over the complete trials, optuna's evaluator: a rough guide with few trials):\n\n"
            "| parameter | importance |\n|---|---|\n"
            + "".join(f"| {k} | {v:.3f} |\n" for k, v in st["importances"].items())
        )
    return text


def pareto_plot(pts: list[Point], path: Path) -> bool:
    """Trainable parameters against knowledge retained, colour = instruction EM, one marker per layout
    (seeds averaged, error bars one standard deviation), the Pareto set of those outlined, every
    layout that is not a search trial labelled."""
    usable = [p for p in aggregate(pts) if p.knowledge is not None and p.instruction is not None]
    if len(usable) < 2 or len({p.trainable for p in usable}) < 2:  # one budget: no cost axis to draw
        return False
    front = sorted((p for p in pareto_set(usable)), key=lambda p: p.trainable)
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    repeated = [p for p in usable if p.seeds > 1]
    if repeated:
        ax.errorbar(
            [p.trainable for p in repeated],
            [p.knowledge for p in repeated],
            yerr=[p.knowledge_sd for p in repeated],
            fmt="none",
            ecolor="0.4",
            capsize=3,
            lw=0.8,
            label="mean ± sd over seeds",
        )
    sc = ax.scatter(
        [p.trainable for p in usable],
        [p.knowledge for p in usable],
        c=[p.instruction for p in usable],
        cmap="viridis",
        s=[70 if p.seeds > 1 else 40 for p in usable],
        edgecolors="k",
        linewidths=0.5,
        zorder=3,
    )
    ax.plot([p.trainable for p in front], [p.knowledge for p in front], "r--", lw=1, label="Pareto set")
    for p in usable:
        if not is_trial(p.layout):
            ax.annotate(p.label, (p.trainable, p.knowledge), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fig.colorbar(sc, ax=ax, label="instruction EM")
    ax.set(xlabel="trainable parameters", ylabel="knowledge retained", title="Layouts: cost against knowledge")
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def probe_statistics(runs: list[Run], layers: int) -> dict[str, list[float]]:
    """Rule -> per-layer router statistic of the report's uniform runs (mean over them): what a
    probe run would allocate by; {} when no uniform routed run of that depth is in the report."""
    uniform = [r for r in runs if r.results and r.results.get("layout") in (None, "uniform") and r.routing]
    out = {}
    for rule in ROUTER_RULES:
        per_run = [layer_statistics(r.routing, rule) for r in uniform]
        per_run = [v for v in per_run if len(v) == layers]
        if per_run:
            out[rule] = [statistics.fmean(v[layer] for v in per_run) for layer in sorted(per_run[0])]
    return out


def _row_name(p: Point) -> str:
    """A heatmap row: a search trial by its run folder, any other layout by its report row."""
    name = p.name if is_trial(p.layout) or not p.label else p.label
    return f"{name} ({p.runs} runs)" if p.runs > 1 and not name.endswith("runs)") else name


def allocation_heatmap(pts: list[Point], path: Path, probe: dict[str, list[float]] | None = None) -> bool:
    """Rows: the best layouts by instruction EM (seeds averaged) and every named layout; columns: layers; under it, the
    probe's per-layer statistics (each row scaled to its maximum, values printed)."""
    ranked = sorted(aggregate(pts), key=lambda p: -(p.instruction or 0.0))  # seeds of a layout: one row
    rows = ranked[:TOP] + [p for p in ranked[TOP:] if not is_trial(p.layout)]
    if not rows or len({len(p.experts) for p in rows}) != 1:
        return False
    width = len(rows[0].experts)
    probe = {k: v for k, v in (probe or {}).items() if len(v) == width}
    heights = [1.0 + 0.3 * len(rows)] + ([0.4 + 0.3 * len(probe)] if probe else [])
    fig, axes = plt.subplots(
        len(heights),
        1,
        figsize=(4.5 + 0.5 * width, sum(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
        layout="constrained",
    )
    ax = axes[0][0]
    im = ax.imshow([list(p.experts) for p in rows], aspect="auto", cmap="magma")
    ax.set_yticks(range(len(rows)), [f"{_row_name(p)}: EM {_f(p.instruction)}" for p in rows], fontsize=7)
    ax.set_xticks(range(width))
    ax.set(xlabel="layer", title="Experts per layer")
    fig.colorbar(im, ax=ax, label="experts")
    for i, p in enumerate(rows):
        for j, e in enumerate(p.experts):
            ax.text(j, i, str(e), ha="center", va="center", fontsize=7, color="0.5")
    if probe:
        pax = axes[1][0]
        scaled = [[x / max(v) if max(v) > 0 else 0.0 for x in v] for v in probe.values()]
        pim = pax.imshow(scaled, aspect="auto", cmap="Blues", vmin=0, vmax=1)
        fig.colorbar(pim, ax=pax, label="/ row max")
        for i, v in enumerate(probe.values()):
            for j, x in enumerate(v):
                pax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=7)
        pax.set_yticks(range(len(probe)), [f"uniform runs: {k}" for k in probe], fontsize=7)
        pax.set_xticks(range(width))
        pax.set(xlabel="layer")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
