"""`moe-lora report PATH... [--out DIR] [--bootstrap N]`: tables, plots and claim verdicts side by side,
written atomically."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
from pathlib import Path

from moe_lora import outputs
from moe_lora.errors import ConfigError, fail
from moe_lora.report import asymmetry, claims, curves, plots, ranks, search, sweep, tables
from moe_lora.report.collect import Run, collect
from moe_lora.tracking import output_error

log = logging.getLogger(__name__)
LOSS_CURVES = "loss_curves.png"  # train and validation loss per row, mean and band over seeds


def _slug(label: str, limit: int = 60) -> str:
    """A file-name-safe form of a row label: lower case, every run of other characters one ``_``
    (``loramoe (model=gpt2)`` -> ``loramoe_model_gpt2``); long labels are cut and keep a hash so
    that they stay unique (file names have a 255-byte limit)."""
    slug = re.sub(r"[^a-z0-9.-]+", "_", label.lower()).strip("_.") or "row"
    if len(slug) <= limit:
        return slug
    return f"{slug[:limit]}_{hashlib.sha1(label.encode()).hexdigest()[:8]}"


def _slugs(labels: list[str]) -> dict[str, str]:
    """Label -> slug, a hash added where two labels would share one (``a+b`` and ``a b``)."""
    slugs = {label: _slug(label) for label in labels}
    clash = {s for s in slugs.values() if list(slugs.values()).count(s) > 1}
    return {
        label: f"{s}_{hashlib.sha1(label.encode()).hexdigest()[:8]}" if s in clash else s for label, s in slugs.items()
    }


CLAIMS_JSON = "claims.json"  # per claim: n, mean, lo, hi, p, p_adjusted, verdict, warnings, power_n
CLAIM_LINES = "claims.txt"  # one verdict line per claim: printed by `moe-lora report`, gathered by `make tables`


def write_figures(runs: list[Run], rows: list[dict], folder: Path, names: dict, varies: sweep.Varies) -> list:
    """Every plot the runs have data for and the sweep calls for; (title, file name) of those written."""
    figures = []
    bands = curves.curves(runs, names)
    if plots.loss_curves(bands, folder / LOSS_CURVES):
        kinds = "train and validation" if bands.get("validation") else "train; no run recorded a validation loss"
        figures.append((f"Loss curves ({kinds})", LOSS_CURVES))
    candidates = [
        ("CV of expert importance over training", "cv_over_training.png", plots.cv_over_training),
        (
            "Expert-group share by task type over training",
            "group_share_over_training.png",
            plots.group_share_over_training,
        ),
        ("Real experts per token over training", "real_experts_over_training.png", plots.real_experts_over_training),
    ]
    figures += [(title, f) for title, f, plot in candidates if plot(runs, folder / f, names)]
    if len(rows) > 1:
        if plots.knowledge_vs_instruction(rows, folder / "knowledge_vs_instruction.png"):
            figures.append(("Knowledge retained versus instruction accuracy", "knowledge_vs_instruction.png"))
        compared = ", ".join(n for n in varies.names() if n != "seeds") or "rows"
        if plots.metric_bars(rows, folder / "comparison.png", f"Scores by row ({compared} vary)"):
            figures.append((f"Scores compared ({compared})", "comparison.png"))
    if varies.steps and plots.scores_vs_steps(
        tables.by_steps(runs), [h for h in rows[0]["columns"] if h != "wall s"], folder / "scores_vs_steps.png"
    ):
        figures.append(("Scores against training steps", "scores_vs_steps.png"))
    slugs = _slugs([row["label"] for row in rows])
    for row in load_map_rows(runs, rows, names):
        name = f"expert_load_{slugs[row['label']]}.png"
        if plots.load_heatmap(runs, row["label"], folder / name, names):
            figures.append((f"Expert load by task type: {row['label']}", name))
    return figures


MAX_LOAD_MAPS = 12  # expert-load heatmaps per report: a search's trials beyond these are left out


def load_map_rows(runs: list[Run], rows: list[dict], names: dict) -> list[dict]:
    """The rows that get an expert-load heatmap: every row that is not a layout search's trial, then
    trials up to :data:`MAX_LOAD_MAPS` in all (fifty trials make fifty pictures no one reads)."""
    trial_rows = {names[r.path] for r in runs if r.results and search.is_trial(str(r.results.get("layout")))}
    named = [r for r in rows if r["label"] not in trial_rows]
    return named + [r for r in rows if r["label"] in trial_rows][: max(0, MAX_LOAD_MAPS - len(named))]


def write_analyses(
    runs: list[Run], folder: Path, names: dict, figures: list[tuple[str, str]], varies: sweep.Varies
) -> list[str]:
    """Layouts compared (search.md and its plots: only when the layouts vary), HydraLoRA's A/B
    asymmetry and ALoRA's final ranks, where the runs have them: index.md lines."""
    lines: list[str] = []
    pts = search.points(runs, names)
    if varies.layouts and search.is_comparison(pts):
        text = search.markdown(pts, search.read_studies(runs))
        (folder / "search.md").write_text(text)
        lines += ["## Layouts: allocation, cost and scores", "", text]
        if search.pareto_plot(pts, folder / "pareto.png"):
            figures.append(("Layouts: trainable parameters against knowledge retained", "pareto.png"))
        probe = search.probe_statistics(runs, len(pts[0].experts))
        if search.allocation_heatmap(pts, folder / "allocation_heatmap.png", probe):
            figures.append(("Experts per layer", "allocation_heatmap.png"))
    alora_ranks = ranks.final_ranks(runs, names)
    if alora_ranks:
        (folder / "alora_ranks.md").write_text(ranks.markdown(alora_ranks))
        lines += [
            "## ALoRA's final ranks per layer (active components, mean over seeds)",
            "",
            ranks.markdown(alora_ranks),
        ]
    groups = asymmetry.task_loras(runs)
    sims = asymmetry.similarities(groups) if groups else []
    if sims:
        (folder / "asymmetry.md").write_text(asymmetry.markdown(sims))
        if asymmetry.projection_plot(groups, folder / "asymmetry_pca.png"):
            figures.append(("Per-task LoRA matrices, 2-D projection", "asymmetry_pca.png"))
        lines += ["## A/B asymmetry of per-task LoRAs (HydraLoRA's analysis)", "", asymmetry.markdown(sims)]
    return lines


def results_tables(rows: list[dict], varies: sweep.Varies) -> str:
    """The main table, one per model when the models vary (parameters are compared within a
    model); above any table whose rows' trainable parameters differ by more than 1%, a warning
    line (also on stderr)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["model"] if varies.models else "", []).append(row)
    parts = []
    for model, group in groups.items():
        gap = tables.params_gap(group)
        if gap:
            log.warning("warning: results table%s: %s", f" of model {model}" if model else "", gap)
        parts += [
            f"### Model {model}\n" if model else "",
            f"> **Warning:** {gap}.\n" if gap else "",
            tables.markdown(group),
        ]
    if any(r.get("repeated seeds") for r in rows):
        parts.append(
            "\nA row with runs that repeat a seed averages them as one seed: repeats measure run-to-run "
            "noise, not the spread over seeds.\n"
        )
    return "\n".join(p for p in parts if p)


def _results_heading(rows: list[dict]) -> str:
    if len(rows) == 1 and rows[0]["n"] == 1:
        return "## Results"
    if all(len(r["seeds"]) <= 1 for r in rows):
        return "## Results (one seed per row: no spread over seeds, ± is 0)"
    return "## Results (mean ± std over distinct seeds)"


def _header(runs: list[Run], varies: sweep.Varies) -> list[str]:
    """The report's first lines: how many runs, what they vary in, the settings behind the row labels."""
    failed = len(runs) - varies.runs
    lines = ["# moe_lora report", "", f"{varies.runs} finished runs, {failed} failed.", "", sweep.summary(varies)]
    if varies.runs == 1:
        lines += ["", f"Run folder: `{next(r.path for r in runs if r.results is not None)}`."]
    keys = tables.varied_keys(runs)
    if keys:
        lines += ["", "Settings that differ within a variant: " + ", ".join(f"`{k}`" for k in keys) + "."]
    return [*lines, ""]


def write_report(runs: list[Run], folder: Path, bootstrap: int = 0, items: bool = False) -> None:
    rows, names, varies = tables.aggregate(runs), tables.row_labels(runs), sweep.what_varies(runs)
    results_md = results_tables(rows, varies)
    routing_md = tables.routing_markdown(rows)
    routing_title = "## Routing statistics (final window; mean over modules, then mean ± std over seeds)"
    (folder / "results.md").write_text(results_md + (f"\n{routing_title}\n\n{routing_md}" if routing_md else ""))
    (folder / "results.csv").write_text(tables.to_csv(rows))
    (folder / "results.tex").write_text(tables.latex(rows))
    figures = write_figures(runs, rows, folder, names, varies)
    analyses = write_analyses(runs, folder, names, figures, varies)
    verdicts, claim_warnings = claims.evaluate_all(runs, bootstrap, items)
    records = [v.record() for v in verdicts]
    (folder / CLAIMS_JSON).write_text(
        json.dumps(
            {
                "bootstrap": bootstrap,
                "items": items,
                "rule": claims.RULE,
                "claims": records,
                "warnings": claim_warnings,
            },
            indent=2,
        )
        + "\n"
    )
    records = json.loads((folder / CLAIMS_JSON).read_text())["claims"]  # the text is rendered from the file
    claims_md = claims.markdown(records, claim_warnings, bootstrap)
    (folder / "claims.md").write_text(f"# Claims (paired by seed)\n\n{claims_md}")
    (folder / CLAIM_LINES).write_text("".join(claims.summary_line(r) + "\n" for r in records))
    failed = [r for r in runs if r.results is None]
    lines = [
        *_header(runs, varies),
        _results_heading(rows),
        "",
        results_md,
        "Also as [CSV](results.csv) and [LaTeX](results.tex).",
        "",
        *([routing_title, "", routing_md] if routing_md else []),
        *(
            ["## Claims (paired by seed)", "", claims_md, "Also in [claims.md](claims.md).", ""]
            if varies.runs > 1
            else []
        ),
        *analyses,
    ]
    if failed:
        lines += ["## Failed runs", ""] + [f"- `{r.path}`: {r.error}" for r in failed] + [""]
    if figures:
        lines += ["## Plots", ""] + [f"### {t}\n\n![{t}]({f})\n" for t, f in figures]
    (folder / "index.md").write_text("\n".join(lines))


def build_report(paths: list[Path], out: Path | None = None, bootstrap: int = 0, items: bool = False) -> Path:
    """Collect runs below ``paths`` and (re)write the report folder ``out`` as a whole: it is
    built in a temporary folder beside it and swapped in, so readers never see half a report and
    nothing outside ``out`` is touched. Only a new or empty folder, or one a report wrote before
    (its marker, :data:`~moe_lora.outputs.REPORT_MARKER`), is replaced; a folder that is, holds or
    lies inside a run or a reported folder is refused (a ``ConfigError``) before anything is read."""
    out = out or (paths[0] if paths[0].is_dir() else paths[0].parent) / "report"
    outputs.check_report_folder(out, [p if p.is_dir() else p.parent for p in paths])
    runs = collect(paths)
    if not runs:
        raise FileNotFoundError(f"no moe-lora runs (results.json) below {', '.join(map(str, paths))}")
    try:
        with outputs.atomic_dir(out) as tmp:
            write_report(runs, tmp, bootstrap, items)
            outputs.write_report_marker(tmp)
    except OSError as exc:  # a full disk, an unwritable folder: one line; the earlier report stays
        raise output_error(out, exc, "choose a writable --out") from exc
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moe-lora report", description=__doc__)
    p.add_argument("paths", nargs="+", type=Path, help="run or sweep folders (searched recursively)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: <first path>/report)")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="claim p from an exact sign-flip test below "
        f"{claims.MIN_BOOTSTRAP_PAIRS} seed pairs, and intervals and p from N bootstrap-t resamples (fixed "
        "seed) from there, instead of the t distribution",
    )
    p.add_argument(
        "--items",
        action="store_true",
        help="also a two-level bootstrap interval (seeds x evaluation items, from predictions.jsonl) for claims "
        "on exact-match metrics",
    )
    a = p.parse_args(argv)
    if a.bootstrap < 0:
        p.error("--bootstrap must be >= 0")
    try:
        out = build_report(a.paths, a.out, a.bootstrap, a.items)
    except FileNotFoundError as exc:
        print(f"moe-lora: error: {exc}")
        return 2
    except ConfigError as exc:  # an --out the report must not replace
        return fail(str(exc))
    print(f"report: {out / 'index.md'}")
    print((out / CLAIM_LINES).read_text(), end="")
    return 0
