"""Aggregate runs into rows (mean +- std over seeds) and render markdown, CSV and LaTeX."""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from pathlib import Path

from moe_lora import outputs
from moe_lora.report.collect import Run
from moe_lora.report.routing_stats import final_knowledge_share, final_stat, task_types

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


def _flatten(d: dict) -> dict[str, object]:
    return {k: repr(v) for k, v in outputs.flatten(d).items()}


def _condense(keys: list[str]) -> list[str]:
    """Where a whole config group differs (``model.name`` varies), its name stands for all of its
    fields: runs of two models read ``(model.name=gpt2)``, not every architecture field."""
    groups = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".name") and "." in k}
    return [
        k
        for k in keys
        if (k.endswith(".name") and k.rsplit(".", 1)[0] in groups) or not any(k.startswith(g + ".") for g in groups)
    ]


def row_labels(runs: list[Run]) -> dict[Path, str]:
    """A run's row: its label, plus every setting that varies between runs of that label (other
    than the seed), e.g. ``loramoe (recipe.max_steps=150)``; runs differing only by seed share it."""
    by_label: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.results is not None:
            by_label[run.label].append(run)
    names = {}
    for label, group in by_label.items():
        flat = {r.path: _flatten(r.results.get("config", {})) for r in group}
        keys = sorted(k for k in {k for f in flat.values() for k in f} - {"seed"} if outputs.changes_training(k))
        varying = _condense([k for k in keys if len({f.get(k) for f in flat.values()}) > 1])
        for r in group:
            extra = ", ".join(f"{k}={flat[r.path].get(k, '-')}" for k in varying)
            names[r.path] = f"{label} ({extra})" if extra else label
    return names


def aggregate(runs: list[Run]) -> list[dict]:
    """One row per label (and varying setting), in first-seen order, mean and std over seeds; every
    row has the same keys (its ``columns``: the metric columns and wall time, then its ``routing
    columns``), None where an arm lacks one."""
    names, tasks, columns = row_labels(runs), task_types(runs), metric_columns(runs)
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        if run.results is not None:
            groups[names[run.path]].append(run.results)
    rows = []
    for label, results in groups.items():
        row = {
            "label": label,
            "seeds": sorted({r["seed"] for r in results}),
            "n": len(results),
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
            vs = [v for v in vs if v is not None]
            row[h] = (statistics.fmean(vs), statistics.stdev(vs) if len(vs) > 1 else 0.0) if vs else None
        rows.append(row)
    return rows


def _pm(v: tuple[float, float] | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _headers(rows: list[dict]) -> list[str]:
    """The metric columns of the rows (they all have the same), and wall time."""
    return rows[0]["columns"] if rows else [h for h, _ in DEFAULT_COLUMNS] + ["wall s"]


def markdown(rows: list[dict]) -> str:
    headers = _headers(rows)
    head = ["variant", "seeds", "trainable params", "w/o routers", "expert slots", "active expert-rank", *headers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["label"],
            str(r["n"]),
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
        ]
    )
    for r in rows:
        w.writerow(
            [
                r["label"],
                r["n"],
                r["trainable"],
                "" if r["without routers"] is None else r["without routers"],
                *(x for h in headers for x in ((r[h][0], r[h][1]) if r[h] else ("", ""))),
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
