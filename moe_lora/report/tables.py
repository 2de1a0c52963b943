"""Aggregate runs into rows (mean +- std over seeds) and render markdown, CSV and LaTeX."""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from pathlib import Path

from moe_lora.report.collect import Run

COLUMNS = [  # (header, key in results["metrics"] or a function of the results)
    ("CBQA EM", "cbqa_em"),
    ("CBQA cand. acc", "cbqa_candidate_acc"),
    ("knowledge retained", "knowledge_retained"),
    ("instruction EM", "instruction_em"),
]


def mean_cv(results: dict) -> float | None:
    return mean_routing(results, "cv")


def mean_routing(results: dict, stat: str) -> float | None:
    """A final-window routing statistic averaged over the adapted modules (None where absent)."""
    values = [r[stat] for r in results.get("routing", {}).values() if r.get(stat) is not None]
    return sum(values) / len(values) if values else None


_NOT_A_SETTING = {"seed", "label", "run_dir", "cache_dir"}


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = repr(v)
    return out


def _condense(keys: list[str]) -> list[str]:
    """Where a whole config group differs (``model.name`` varies), its name stands for all of its
    fields: runs of two models read ``(model.name=gpt2)``, not every architecture field."""
    groups = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".name") and "." in k}
    return [k for k in keys if (k.endswith(".name") and k.rsplit(".", 1)[0] in groups)
            or not any(k.startswith(g + ".") for g in groups)]


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
        keys = sorted({k for f in flat.values() for k in f} - _NOT_A_SETTING)
        varying = _condense([k for k in keys if len({f.get(k) for f in flat.values()}) > 1])
        for r in group:
            extra = ", ".join(f"{k}={flat[r.path].get(k, '-')}" for k in varying)
            names[r.path] = f"{label} ({extra})" if extra else label
    return names


def aggregate(runs: list[Run]) -> list[dict]:
    """One row per label (and varying setting), in first-seen order, mean and std over seeds."""
    names = row_labels(runs)
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        if run.results is not None:
            groups[names[run.path]].append(run.results)
    rows = []
    for label, results in groups.items():
        row = {"label": label, "seeds": sorted({r["seed"] for r in results}), "n": len(results),
               "trainable": results[0]["params"]["trainable"]}
        values = {h: [r["metrics"].get(k) for r in results] for h, k in COLUMNS}
        values["routing CV"] = [mean_cv(r) for r in results]
        values["real experts/token"] = [mean_routing(r, "real_experts_per_token") for r in results]
        values["null rate"] = [mean_routing(r, "null_rate") for r in results]
        values["wall s"] = [r["wall_s"] for r in results]
        for h, vs in values.items():
            vs = [v for v in vs if v is not None]
            row[h] = (statistics.fmean(vs), statistics.stdev(vs) if len(vs) > 1 else 0.0) if vs else None
        rows.append(row)
    return rows


HEADERS = [h for h, _ in COLUMNS] + ["routing CV", "real experts/token", "null rate", "wall s"]


def _pm(v: tuple[float, float] | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    head = ["variant", "seeds", "trainable params", *HEADERS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], str(r["n"]), f"{r['trainable']:,}",
                 *(_pm(r[h], 1 if h == "wall s" else 3) for h in HEADERS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["variant", "seeds", "trainable_params",
                *(f"{h.replace(' ', '_')}_{s}" for h in HEADERS for s in ("mean", "std"))])
    for r in rows:
        w.writerow([r["label"], r["n"], r["trainable"],
                    *(x for h in HEADERS for x in ((r[h][0], r[h][1]) if r[h] else ("", "")))])
    return buf.getvalue()


def latex(rows: list[dict]) -> str:
    head = ["variant", "params", *HEADERS[:4]]
    lines = [r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
    for r in rows:
        cells = [r["label"].replace("_", r"\_"), f"{r['trainable']:,}".replace(",", "{,}"),
                 *(("-" if r[h] is None else f"{r[h][0]:.3f} $\\pm$ {r[h][1]:.3f}") for h in HEADERS[:4])]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
