"""The model card (``README.md``) of a moe_lora export: what it is, how to load it, the run's
metrics (base -> tuned, the report's main columns), its routing summary and its claims."""

from __future__ import annotations

from typing import Any


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)


def metrics_table(results: dict[str, Any]) -> list[str]:
    """The report's main columns (``metric_columns`` with ``report``), base -> tuned."""
    metrics = results.get("metrics", {})
    rows = ["| metric | base | tuned |", "|---|---|---|"]
    for col in results.get("metric_columns", []):
        key = col.get("key")
        if col.get("report") and key in metrics and metrics[key] is not None:
            rows.append(f"| {col.get('header', key)} | {_num(metrics.get(f'{key}_base'))} | {_num(metrics[key])} |")
    return rows if len(rows) > 2 else []


def routing_table(results: dict[str, Any]) -> list[str]:
    """Per adapted module of a routed variant: CV and entropy of the router's importance and the
    share of the probability mass of its most used expert, over the final logging window."""
    routing = results.get("routing") or {}
    if not routing:
        return []
    rows = ["| module | CV | entropy | top expert share |", "|---|---|---|---|"]
    for module, s in routing.items():
        imp = s.get("importance") or []
        share = max(imp) / sum(imp) if imp and sum(imp) > 0 else None
        rows.append(f"| {module} | {_num(s.get('cv'))} | {_num(s.get('entropy'))} | {_num(share)} |")
    return rows


def claim_line(c: Any) -> str:
    if not isinstance(c, dict):
        return f"- {c}"
    return f"- {c.get('name')}: {c.get('arm')} vs {c.get('than')} on {c.get('metric')} ({c.get('kind', 'superiority')})"


def model_card(meta: dict[str, Any], results: dict[str, Any] | None) -> str:
    base = meta["base_model"]
    cfg = meta["config"]
    variant = meta["variant"]
    front = ["---", "library_name: moe_lora", f"tags: [moe_lora, {variant}]"]
    if base["source"] == "hub":
        front.append(f"base_model: {base['name_or_path']}")
    front.append("---")
    lines = [
        *front,
        "",
        f"# {variant} adapter on {base['name']}",
        "",
        f"A `{variant}` adapter trained with moe_lora on `{base['name_or_path']}` "
        f"(data `{cfg.get('data', {}).get('name', '?')}`, recipe `{cfg.get('recipe', {}).get('name', '?')}`, "
        f"layout `{meta['layout']['name']}`, seed {cfg.get('seed')}), targets {meta['targets']}, "
        f"{len(meta['adapted_modules'])} adapted modules. Format: moe_lora v{meta['format_version']} "
        "(docs/export-format.md).",
        "",
        "## Use",
        "",
        "```python",
        "import moe_lora",
        'model, tok = moe_lora.load("path/to/this/folder")',
        "```",
        "",
        "or `moe-lora generate path/to/this/folder --prompt '...'`.",
    ]
    if results is not None:
        table = metrics_table(results)
        if table:
            lines += ["", "## Metrics (base -> tuned)", "", *table]
        routing = routing_table(results)
        if routing:
            lines += ["", "## Routing (final logging window)", "", *routing]
    claims = cfg.get("claims") or []
    if claims:  # the preset's claims this run is an arm of (judged by `moe-lora report` over seeds)
        lines += ["", "## Claims", "", *(claim_line(c) for c in claims)]
    return "\n".join(lines) + "\n"
