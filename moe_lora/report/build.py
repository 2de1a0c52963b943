"""`moe-lora report PATH... [--out DIR] [--bootstrap N]`: tables, plots and claim verdicts side by side,
written atomically."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from moe_lora import outputs
from moe_lora.errors import ConfigError, fail
from moe_lora.report import asymmetry, claims, plots, ranks, search
from moe_lora.report.collect import Run, collect
from moe_lora.report.tables import aggregate, latex, markdown, routing_markdown, row_labels, to_csv
from moe_lora.tracking import output_error


def _slug(label: str, limit: int = 60) -> str:
    """A file-name-safe form of a row label; long labels are cut and keep a hash so that they stay
    unique (file names have a 255-byte limit)."""
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
    if len(slug) <= limit:
        return slug
    return f"{slug[:limit]}_{hashlib.sha1(label.encode()).hexdigest()[:8]}"


CLAIMS_JSON = "claims.json"  # per claim: n, mean, lo, hi, p, p_adjusted, verdict, warnings, power_n
CLAIM_LINES = "claims.txt"  # one verdict line per claim: printed by `moe-lora report`, gathered by `make tables`


def write_figures(runs: list[Run], rows: list[dict], folder: Path, names: dict) -> list[tuple[str, str]]:
    """Every plot the runs have data for; (title, file name) of those written."""
    candidates = [
        ("CV of expert importance over training", "cv_over_training.png", plots.cv_over_training, runs, names),
        (
            "Expert-group share by task type over training",
            "group_share_over_training.png",
            plots.group_share_over_training,
            runs,
            names,
        ),
        (
            "Real experts per token over training",
            "real_experts_over_training.png",
            plots.real_experts_over_training,
            runs,
            names,
        ),
    ]
    figures = [(title, f) for title, f, plot, data, extra in candidates if plot(data, folder / f, extra)]
    if plots.knowledge_vs_instruction(rows, folder / "knowledge_vs_instruction.png"):
        figures.append(("Knowledge retained versus instruction accuracy", "knowledge_vs_instruction.png"))
    if len({r.results.get("layout") for r in runs if r.results}) > 1 and plots.metric_bars(
        rows, folder / "layout_comparison.png", "Layouts compared"
    ):
        figures.append(("Layout comparison", "layout_comparison.png"))
    for row in rows:
        name = f"expert_load_{_slug(row['label'])}.png"
        if plots.load_heatmap(runs, row["label"], folder / name, names):
            figures.append((f"Expert load by task type: {row['label']}", name))
    return figures


def write_analyses(runs: list[Run], folder: Path, names: dict, figures: list[tuple[str, str]]) -> list[str]:
    """Layouts compared (search.md and its plots), HydraLoRA's A/B asymmetry and ALoRA's final
    ranks, where the runs have them: index.md lines."""
    lines: list[str] = []
    pts = search.points(runs)
    if search.is_comparison(pts):
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


def write_report(runs: list[Run], folder: Path, bootstrap: int = 0, items: bool = False) -> None:
    rows, names = aggregate(runs), row_labels(runs)
    routing_md = routing_markdown(rows)
    routing_title = "## Routing statistics (final window; mean over modules, then mean ± std over seeds)"
    (folder / "results.md").write_text(markdown(rows) + (f"\n{routing_title}\n\n{routing_md}" if routing_md else ""))
    (folder / "results.csv").write_text(to_csv(rows))
    (folder / "results.tex").write_text(latex(rows))
    figures = write_figures(runs, rows, folder, names)
    analyses = write_analyses(runs, folder, names, figures)
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
        "# moe_lora report",
        "",
        f"{len(runs) - len(failed)} finished runs, {len(failed)} failed.",
        "",
        "## Results (mean ± std over seeds)",
        "",
        markdown(rows),
        "Also as [CSV](results.csv) and [LaTeX](results.tex).",
        "",
        *([routing_title, "", routing_md] if routing_md else []),
        "## Claims (paired by seed)",
        "",
        claims_md,
        "Also in [claims.md](claims.md).",
        "",
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
