"""What a finished run writes about itself: ``results.json``, ``predictions.jsonl``, the adapter and
the summary printed at the end. Metric keys come from the metric kinds' column declarations (``eval/kinds/``),
which results.json also carries (``metric_columns``) for the report."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from moe_lora.eval.kinds import COLUMNS, compare
from moe_lora.eval.kinds.base import declarations
from moe_lora.tracking import atomic_path, write_jsonl_atomic
from moe_lora.world.spread import hydra_overrides, load_spread, numerics, spread_rows


def write_adapter(path: Path, tensors: dict) -> None:
    """``adapter_model.safetensors`` (or the init adapter) through a temporary file and a rename of
    the project's own: whole or absent on every safetensors version (only 0.8 renames by itself),
    readable like the other run files, and a full disk is one line naming the file."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def write_predictions(path: Path, base: list[dict], tuned: list[dict]) -> None:
    """Every evaluated example of the base and the tuned model (lm-eval's ``--log_samples``)."""
    rows = [{"model": "base", **r} for r in base] + [{"model": "tuned", **r} for r in tuned]
    write_jsonl_atomic(path, rows)


def build_results(cfg, resolved, base, tuned, params, adapted, routing, wall) -> dict[str, Any]:
    """results.json: the run's identity, parameter counts, base-vs-tuned metrics, the final routing
    window of every module, wall time, and the resolved config."""
    metrics = compare(base, tuned)
    if "harness" in tuned:
        metrics["harness"] = tuned["harness"]
    final = {
        m: {**rows["all"], "by_task_type": {t: r for t, r in rows.items() if t != "all"}}
        for m, rows in routing.items()
        if "all" in rows
    }
    return {
        "adapter": cfg.adapter.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "layout": cfg.layout.name,
        "recipe": cfg.recipe.name,
        "seed": cfg.seed,
        "model_path": cfg.model.name_or_path,
        "params": {
            **params,
            "adapted_modules": len(adapted),
            "trainable_share": params["trainable"] / max(1, params["total"] - params["trainable"]),
        },
        "metrics": metrics,
        "metric_columns": declarations(),
        "routing": final,
        "routing_by_stack": by_stack(final),
        "wall_s": wall,
        "numerics": numerics(),  # ISA kernels, MKL branch, threads, CPU: what makes machines differ
        "overrides": hydra_overrides(),  # the command line's, minus paths and threads: the spread's match
        "config": resolved,
        "adapter_config": dataclasses.asdict(cfg.adapter),
    }


def stack_of(module: str) -> str:
    """The layer list a module sits in (``model.layers``, ``encoder.block``, ``decoder.block``)."""
    m = re.search(r"\.\d+\.", module)
    return module[: m.start()] if m else ""


def by_stack(routing: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Mean CV and routing entropy over each stack's adapted linears: an encoder-decoder's encoder
    and decoder side by side (one entry for a causal LM)."""
    groups: dict[str, list[dict]] = {}
    for module, row in routing.items():
        groups.setdefault(stack_of(module), []).append(row)
    return {
        stack: {k: sum(r[k] for r in rows) / len(rows) for k in ("cv", "entropy") if all(k in r for r in rows)}
        for stack, rows in groups.items()
    }


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _flat(nested: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{k}/{t}": v for k, by_t in nested.items() for t, v in (by_t or {}).items()}


def metric_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    """One row per declared column the run computed (base -> tuned; a ratio alone), and its
    breakdown where it has more than one entry. A column with no value for either model (response
    loss on the built-in world, a kind the run has no sets of) has no row: a row of dashes would
    read as a metric that failed."""
    rows = []
    for c in COLUMNS.values():
        if c.ratio_of is not None:
            if m.get(c.key) is not None:
                rows.append((c.header, _f(m.get(c.key))))
            continue
        if m.get(c.key) is None and m.get(c.key + "_base") is None:
            continue
        rows.append((f"{c.header} (base -> tuned)", f"{_f(m.get(c.key + '_base'))} -> {_f(m.get(c.key))}"))
        by, by_base = (m.get(c.by) or {}, m.get(f"{c.by}_base") or {}) if c.by else ({}, {})
        if c.by_template:  # {set: {template: value}} -> one row per set/template
            by, by_base = _flat(by), _flat(by_base)
        if len(by) > 1 or c.by_subtask:
            rows += [(f"  {k}", f"{_f(by_base.get(k))} -> {_f(v)}" if k in by_base else _f(v)) for k, v in by.items()]
    return rows


def _eval_line(ev: dict | None) -> str | None:
    """Evaluation's seconds per phase, share of the wall time and model-input tokens/s."""
    if not ev or not ev.get("seconds"):
        return None
    phases = " + ".join(f"{k} {v:.1f} s" for k, v in ev["seconds"].items())
    share = f", {ev['share_of_wall']:.0%} of wall" if ev.get("share_of_wall") is not None else ""
    rate = f", {ev['tokens_per_s']:,.0f} tokens/s" if ev.get("tokens_per_s") else ""
    return phases + share + rate


def _stack_rows(stacks: dict[str, dict]) -> list[tuple[str, str]]:
    if len(stacks) < 2:
        return []
    return [(f"  {stack}", _f(v.get("cv"))) for stack, v in stacks.items()]


def summary_table(results: dict) -> str:
    """What ``moe-lora train`` (and ``moe-lora eval``, from its own record) prints at the end: only
    what the run computed, so a LoRA run has no routing row and a re-evaluation no throughput."""
    m, p = results["metrics"], results.get("params")
    cvs = [r["cv"] for r in (results.get("routing") or {}).values()]
    perf = results.get("perf") or {}
    evaluation = _eval_line(perf.get("eval"))
    rows = [
        ("adapter", results["adapter"]),
        ("model", results["model"]),
        ("seed", str(results["seed"])),
        ("trainable params", f"{p['trainable']:,} / {p['total']:,}") if p else None,
        *metric_rows(m),
        ("routing CV (mean over layers)", _f(sum(cvs) / len(cvs))) if cvs else None,
        *_stack_rows(results.get("routing_by_stack") or {}),
        ("tokens/s, peak memory", f"{perf['tokens_per_s']:,.0f}, {perf['peak_mem_bytes'] / 2**20:,.0f} MiB")
        if perf.get("tokens_per_s")
        else None,
        ("evaluation", evaluation) if evaluation else None,
        ("wall time", f"{results['wall_s']:.1f} s"),
        *_numerics_rows(results),
    ]
    shown = [r for r in rows if r is not None]
    width = max(len(k) for k, _ in shown)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in shown)


def _numerics_rows(results: dict) -> list[tuple[str, str]]:
    """The CPU numerics the run had, and where it sits against the measured cross-CPU spread."""
    n = results.get("numerics")
    if not n:
        return []
    line = f"{n['cpu']}, {n['capability']} kernels, MKL CNR {n['mkl_cbwr'] or 'off'}, {n['threads']} threads"
    if n.get("mode") == "portable":
        line += ", portable" if n["capability"] == "AVX2" else ", portable requested but this CPU has no AVX2"
    return [("numerics", line), *spread_rows(results, load_spread())]
