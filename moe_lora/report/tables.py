"""Aggregate runs into rows (mean +- std over seeds) and render markdown, CSV and LaTeX."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path

from moe_lora import outputs
from moe_lora.report.collect import Run
from moe_lora.report.routing_stats import final_knowledge_share, final_stat, task_types
from moe_lora.report.sweep import STEPS, config_value, model_of

# (header, key in results["metrics"]) for result files written before they declared their columns
DEFAULT_COLUMNS = [
    ("CBQA EM", "cbqa_em"),
    ("CBQA candidate acc", "cbqa_candidate_acc"),
    ("knowledge retained", "knowledge_retained"),
    ("instruction EM", "instruction_em"),
]
ROUTING_NOTE = (
    "Final logging window, mean over adapted modules, then mean ± std over seeds. `CV@t`: CV of expert "
    "importance over task type t's tokens only (LoRAMoE's LBC constrains it per type). `knowledge-group "
    "share@t`: share of t's router probability mass on the world-knowledge expert group (LoRAMoE's first "
    "half, or `lbc_expert_types` 0); the instruction group gets the rest, and 0.5 means no split by task "
    'type; shown for LoRAMoE arms only. "-": the arm has no such statistic.'
)


def metric_columns(runs: list[Run]) -> list[tuple[str, str]]:
    """The main table's metric columns: those the runs' results.json declare for the report
    (``metric_columns``, written from the metric kinds' declarations), in first-seen order; a
    declared column that no run scored (rank classification in a run without multiple-choice sets)
    is left out."""
    seen: dict[str, str] = {}
    for run in runs:
        declared = (run.results or {}).get("metric_columns")
        for c in (
            declared if declared is not None else [{"key": k, "header": h, "report": True} for h, k in DEFAULT_COLUMNS]
        ):
            scored = ((run.results or {}).get("metrics") or {}).get(c["key"]) is not None
            if c["report"] and (not c.get("optional") or scored):
                seen.setdefault(c["key"], c["header"])
    return [(h, k) for k, h in seen.items()] or DEFAULT_COLUMNS


def routing_headers(tasks: list[str]) -> list[str]:
    """The routing table's columns: each task type's CV beside the ``all`` CV, then AdaMoE's and
    LoRAMoE's statistics."""
    return [
        "routing CV",
        *(f"CV@{t}" for t in tasks),
        "real experts/token",
        "null rate",
        *(f"knowledge-group share@{t}" for t in tasks),
    ]


def _routing_values(results: dict, tasks: list[str]) -> dict[str, float | None]:
    return {
        "routing CV": final_stat(results, "cv"),
        **{f"CV@{t}": final_stat(results, "cv", t) for t in tasks},
        "real experts/token": final_stat(results, "real_experts_per_token"),
        "null rate": final_stat(results, "null_rate"),
        **{f"knowledge-group share@{t}": final_knowledge_share(results, t) for t in tasks},
    }


def without_routers(results: dict) -> int | None:
    """Trainable parameters minus the routers': what the experts themselves cost, the number
    MoE papers match their baselines on. None for results written before routers were counted."""
    params = results.get("params", {})
    return params["trainable"] - params["routers"] if "routers" in params else None


MAX_LIST = 24  # characters of a list value in a row label; longer lists read "[n items]"


def fmt_value(v: object, digits: int = 3) -> str:
    """A setting's value in a row label: floats to ``digits`` significant digits, text without
    quotes, short lists inline (``digits`` > 6: every list inline, floats in full)."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "-"
    if isinstance(v, float):
        return repr(v) if digits > 6 else f"{v:.{digits}g}"
    if isinstance(v, list | tuple):
        text = "[" + ",".join(fmt_value(x, digits) for x in v) + "]"
        return text if len(text) <= MAX_LIST or digits > 6 else f"[{len(v)} items]"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def _condense(keys: list[str]) -> list[str]:
    """Where a whole config group differs (``model.name`` varies), its name stands for all of its
    fields: runs of two models read ``(model=gpt2)``, not every architecture field."""
    groups = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".name") and "." in k}
    return [
        k
        for k in keys
        if (k.endswith(".name") and k.rsplit(".", 1)[0] in groups) or not any(k.startswith(g + ".") for g in groups)
    ]


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's shortest dotted suffix that no other key of ``keys`` shares (``recipe.max_steps``
    -> ``max_steps``; ``adapter.rank`` and ``layout.rank`` stay whole); a group's ``.name`` key is
    the group (``model.name`` -> ``model``)."""
    names = {k: k.removesuffix(".name") if k.endswith(".name") and "." in k else k for k in keys}
    out = {}
    for k, name in names.items():
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != k and (o_name == suffix or o_name.endswith("." + suffix)) for o, o_name in names.items()):
                break
        out[k] = suffix
    return out


def _key(v: object) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _digits(values: list[object]) -> int:
    """The fewest significant digits (3, 4, 6, all) that keep distinct values distinct."""
    distinct = {_key(v) for v in values}
    for d in (3, 4, 6, 17):
        if len({fmt_value(v, d) for v in values}) == len(distinct):
            return d
    return 17


def _distinguishing(flat: dict[Path, dict], keys: list[str]) -> list[str]:
    """The keys, in order, each of which tells apart runs the ones before it do not: settings that
    change together (a learning rate and its warmup in two arms) name the row once."""
    chosen: list[str] = []
    seen = 1
    for k in keys:
        n = len({tuple(_key(f.get(c)) for c in [*chosen, k]) for f in flat.values()})
        if n > seen:
            chosen.append(k)
            seen = n
    return chosen


def varying_settings(group: list[Run], ignore: tuple[str, ...] = ()) -> dict[Path, dict[str, object]]:
    """Run -> the training settings (dotted keys, not the seed) that differ between runs of one
    label, condensed to a group's name where a whole group differs."""
    flat = {r.path: outputs.flatten(r.results.get("config", {})) for r in group}
    keys = sorted(
        k
        for k in {k for f in flat.values() for k in f} - {"seed", *ignore}
        if outputs.changes_training(k) and not any(k.startswith(i + ".") for i in ignore)
    )
    varying = _condense([k for k in keys if len({_key(f.get(k)) for f in flat.values()}) > 1])
    return {p: {k: f.get(k) for k in varying} for p, f in flat.items()}


def row_labels(runs: list[Run], ignore: tuple[str, ...] = ()) -> dict[Path, str]:
    """A run's row: its label, plus the settings that tell apart runs of that label (other than the
    seed and ``ignore``), short and rounded, e.g. ``loramoe (max_steps=150)``; runs differing only
    by seed share it."""
    by_label: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.results is not None:
            by_label[run.label].append(run)
    names = {}
    for label, group in by_label.items():
        settings = varying_settings(group, ignore)
        keys = _distinguishing(settings, list(next(iter(settings.values()))))
        short = short_keys(keys)
        digits = {k: _digits([s[k] for s in settings.values()]) for k in keys}
        for r in group:
            extra = ", ".join(f"{short[k]}={fmt_value(settings[r.path][k], digits[k])}" for k in keys)
            names[r.path] = f"{label} ({extra})" if extra else label
    return names


def _by_seed(results: list[dict], values: list[float | None]) -> list[float]:
    """One value per distinct seed: runs that repeat a seed are averaged first, so that they count
    as one seed, not as a spread over seeds."""
    per_seed: dict[object, list[float]] = defaultdict(list)
    for r, v in zip(results, values, strict=True):
        if v is not None:
            per_seed[r["seed"]].append(v)
    return [statistics.fmean(vs) for vs in per_seed.values()]


def aggregate(runs: list[Run]) -> list[dict]:
    """One row per label (and varying setting), in first-seen order, mean and std over distinct seeds
    (runs repeating a seed averaged first: ``n`` counts runs, ``seeds`` the distinct seeds); every
    row has the same keys (its ``columns``: the metric columns and wall time, then its ``routing
    columns``), None where an arm lacks one."""
    names, tasks, columns = row_labels(runs), task_types(runs), metric_columns(runs)
    groups: dict[str, list[dict]] = defaultdict(list)
    models: dict[str, str] = {}
    for run in runs:
        if run.results is not None:
            groups[names[run.path]].append(run.results)
            models.setdefault(names[run.path], model_of(run))
    rows = []
    for label, results in groups.items():
        seeds = [r["seed"] for r in results]
        row = {
            "label": label,
            "model": models[label],
            "seeds": sorted(set(seeds)),
            "n": len(results),
            "repeated seeds": {s: seeds.count(s) for s in sorted(set(seeds)) if seeds.count(s) > 1},
            "trainable": results[0]["params"]["trainable"],
            "without routers": without_routers(results[0]),
            "expert slots": (results[0].get("budget") or {}).get("expert_slots"),
            "active expert-rank": (results[0].get("budget") or {}).get("active_expert_rank"),
            "columns": [h for h, _ in columns] + ["wall s"],
            "routing columns": routing_headers(tasks),
        }
        values = {h: [r["metrics"].get(k) for r in results] for h, k in columns}
        values["wall s"] = [r["wall_s"] for r in results]
        per_run = [_routing_values(r, tasks) for r in results]
        values |= {h: [v[h] for v in per_run] for h in row["routing columns"]}
        for h, vs in values.items():
            vs = _by_seed(results, vs)
            row[h] = (statistics.fmean(vs), statistics.stdev(vs) if len(vs) > 1 else 0.0) if vs else None
        rows.append(row)
    return rows


def by_steps(runs: list[Run]) -> dict[str, dict[int, dict[str, tuple[float, float]]]]:
    """Row label without the steps -> ``recipe.max_steps`` -> metric column -> (mean, std) over
    distinct seeds: how each arm's scores move with the length of training."""
    names, columns = row_labels(runs, ignore=(STEPS,)), metric_columns(runs)
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for run in runs:
        steps = config_value(run, STEPS)
        if run.results is not None and isinstance(steps, int):
            groups[(names[run.path], steps)].append(run.results)
    out: dict[str, dict[int, dict[str, tuple[float, float]]]] = defaultdict(dict)
    for (label, steps), results in groups.items():
        cell = {}
        for h, k in columns:
            vs = _by_seed(results, [r["metrics"].get(k) for r in results])
            if vs:
                cell[h] = (statistics.fmean(vs), statistics.stdev(vs) if len(vs) > 1 else 0.0)
        out[label][steps] = cell
    return dict(out)


def varied_keys(runs: list[Run]) -> list[str]:
    """Every training setting that differs between runs of one label (row labels name only the
    keys that tell rows apart)."""
    by_label: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.results is not None:
            by_label[run.label].append(run)
    keys = {k for group in by_label.values() for s in varying_settings(group).values() for k in s}
    return sorted(keys)


def _pm(v: tuple[float, float] | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _headers(rows: list[dict]) -> list[str]:
    """The metric columns of the rows (they all have the same), and wall time."""
    return rows[0]["columns"] if rows else [h for h, _ in DEFAULT_COLUMNS] + ["wall s"]


def seed_count(row: dict) -> str:
    """Distinct seeds, and the runs behind them where a seed was run more than once: ``1 (2 runs
    of seed 0)``, never "2 seeds"."""
    seeds, repeated = len(row["seeds"]), row.get("repeated seeds") or {}
    if not repeated:
        return str(seeds)
    again = ", ".join(f"{n} runs of seed {s}" for s, n in repeated.items())
    return f"{seeds} ({again})"


PARAMS_TOLERANCE = 0.01  # rows of one table whose trainable parameters differ by more are flagged


def params_gap(rows: list[dict]) -> str | None:
    """A warning when the rows' trainable parameters differ by more than 1%: an unequal budget
    decides many comparisons by itself (None when they agree, or with fewer than two rows)."""
    if len(rows) < 2:
        return None
    lo, hi = min(rows, key=lambda r: r["trainable"]), max(rows, key=lambda r: r["trainable"])
    if hi["trainable"] <= 0 or (hi["trainable"] - lo["trainable"]) / hi["trainable"] <= PARAMS_TOLERANCE:
        return None
    gap = (hi["trainable"] - lo["trainable"]) / hi["trainable"]
    return (
        f"trainable parameters differ by {gap:.1%} between rows ({lo['label']}: {lo['trainable']:,}, "
        f"{hi['label']}: {hi['trainable']:,}); score differences may come from the budget: match it (rank, experts, "
        "layout budget) or read the table with that in mind"
    )


def markdown(rows: list[dict]) -> str:
    headers = _headers(rows)
    head = ["variant", "seeds", "trainable params", "w/o routers", "expert slots", "active expert-rank", *headers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["label"],
            seed_count(r),
            f"{r['trainable']:,}",
            _count(r["without routers"]),
            _count(r.get("expert slots")),
            _count(r.get("active expert-rank")),
            *(_pm(r[h], 1 if h == "wall s" else 3) for h in headers),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def routing_markdown(rows: list[dict]) -> str:
    """The routing statistics of the arms that route (empty when none does); a second table so
    that the main one stays readable."""
    routed = [r for r in rows if any(r[h] is not None for h in r["routing columns"])]
    if not routed:
        return ""
    head = ["variant", *routed[0]["routing columns"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r["label"], *(_pm(r[h]) for h in r["routing columns"])]) + " |" for r in routed]
    return "\n".join(lines) + "\n\n" + ROUTING_NOTE + "\n"


def to_csv(rows: list[dict]) -> str:
    headers = _headers(rows) + (rows[0]["routing columns"] if rows else [])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "variant",
            "seeds",
            "trainable_params",
            "trainable_params_without_routers",
            *(f"{h.replace(' ', '_')}_{s}" for h in headers for s in ("mean", "std")),
            "runs",
        ]
    )
    for r in rows:
        w.writerow(
            [
                r["label"],
                len(r["seeds"]),
                r["trainable"],
                "" if r["without routers"] is None else r["without routers"],
                *(x for h in headers for x in ((r[h][0], r[h][1]) if r[h] else ("", ""))),
                r["n"],
            ]
        )
    return buf.getvalue()


def latex(rows: list[dict]) -> str:
    metrics = [h for h in _headers(rows) if h != "wall s"]
    head = ["variant", "params", *metrics]
    lines = [r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
    for r in rows:
        cells = [
            r["label"].replace("_", r"\_"),
            f"{r['trainable']:,}".replace(",", "{,}"),
            *(("-" if r[h] is None else f"{r[h][0]:.3f} $\\pm$ {r[h][1]:.3f}") for h in metrics),
        ]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
