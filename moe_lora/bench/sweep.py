"""`moe-lora bench --experts 4,8,16,...`: what a variant costs as its expert count grows.

Every count is one interleaved measurement of :func:`moe_lora.bench.measure.measure` (its variants and
a peft LoRA of its own, rounds rotating as in a single run), all counts in one process; each ratio is
against the peft LoRA measured in the same count's rounds, so drift between counts cancels out of
the ratios. The result is a table (one row per count), a PNG (:mod:`moe_lora.bench.plot`) and, with
``--out``, a JSON holding every count's full single-run result, the series the table and plot are
drawn from, and the settings.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import moe_lora.adapters  # noqa: F401  (registers the variants)
from moe_lora.bench import measure
from moe_lora.bench.plot import expert_sweep_png
from moe_lora.errors import ConfigError
from moe_lora.tracking import write_json_atomic

SERIES = ("median_step_ms", "ratio_vs_peft_lora", "memory_mb", "flop_ratio_vs_peft_lora")


def sweep_variants() -> list[str]:
    """The default of a sweep: every registered variant that has experts, and the grouped path;
    the loop references and compiled models only when named (each costs a full extra model)."""

    def has_experts(name: str) -> bool:
        node = ConfigStore.instance().load(f"schema/adapter/{name}.yaml").node
        return "num_experts" in {f.name for f in fields(OmegaConf.to_object(node))}

    return ["peft_lora", *(v for v in measure.adapted_variants() if has_experts(v)), *measure.grouped_variants()]


def plot_path(a: argparse.Namespace) -> Path:
    """``--plot``, else ``--out``'s stem with ``.png``, else a new timestamped file in outputs/bench/."""
    if a.plot is not None:
        path = a.plot
    elif a.out is not None:
        path = a.out.with_suffix(".png")
        if path == a.out:
            raise ConfigError(f"--out {a.out} ends in .png: name the JSON file .json, or pass --plot")
    else:
        path = Path("outputs/bench") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_experts.png"
    measure.refuse_existing(path, "--plot" if a.plot is not None else "the plot", a.overwrite)
    return path


def at_count(a: argparse.Namespace, experts: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(a), "experts": experts})


def measure_counts(variants: list[str], a: argparse.Namespace) -> dict[int, dict]:
    """Each count's single-run result (``measure.report``), settings and versions taken out."""
    by_count: dict[int, dict] = {}
    for n in a.experts:
        print(f"experts={n}: measuring {', '.join(variants)} ({a.rounds} rounds)", flush=True)
        an = at_count(a, n)
        res = measure.report(measure.measure(variants, an, progress=lambda m, n=n: print(f"  experts={n}: {m}")), an)
        res.pop("settings"), res.pop("versions")
        by_count[n] = res
    return by_count


def series(by_count: dict[int, dict], variants: list[str]) -> dict[str, dict[str, list[float | None]]]:
    """Per variant, per measure, one value per count (in count order): what the table and plot draw.
    Ratios are taken here from the step times and FLOPs of every variant, the loop references and
    telemetry-off variants included; a compiled model has no FLOP count (None)."""
    out: dict[str, dict[str, list[float | None]]] = {}
    for v in variants:
        rows: dict[str, list[float | None]] = {k: [] for k in SERIES}
        for res in by_count.values():
            ms, gf = res["median_step_ms"], res["gflops_per_step"]
            rows["median_step_ms"].append(ms[v])
            rows["ratio_vs_peft_lora"].append(ms[v] / ms["peft_lora"])
            rows["memory_mb"].append(res["memory_mb"][v])
            rows["flop_ratio_vs_peft_lora"].append(gf[v] / gf["peft_lora"] if v in gf else None)
        out[v] = rows
    return out


def grouped_over_dense(by_count: dict[int, dict]) -> dict[str, list[float]]:
    """``{'mola': [grouped step / dense step, per count]}`` for each pair measured at every count."""
    pairs = set.intersection(*(set(res.get("grouped_over_dense", {})) for res in by_count.values()))
    return {v: [res["grouped_over_dense"][v] for res in by_count.values()] for v in sorted(pairs)}


def sweep_table(res: dict) -> str:
    """Markdown: one row per expert count; per variant step ms, x peft LoRA (time), memory MB and
    FLOPs x peft LoRA; then grouped / dense per pair."""
    variants = [v for v in res["variants"] if v != "peft_lora"]
    s = res["series"]
    head = ["experts", "peft_lora ms"]
    for v in variants:
        head += [f"{v} ms", f"{v} x peft", f"{v} MB", f"{v} FLOP x peft"]
    head += [f"{v} grouped/dense" for v in res["grouped_over_dense"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for i, n in enumerate(res["experts"]):
        at = res["by_experts"][str(n)]
        shown, few = at.get("ratios_shown", True), at.get("rounds", measure.MIN_ROUNDS) < measure.MIN_ROUNDS

        def timed(label: str, ratio: float, shown=shown, few=few, at=at) -> str:
            return f"{ratio:.2f}" + ("*" if few or label in at.get("unreliable", {}) else "") if shown else "-"

        cells = [str(n), f"{s['peft_lora']['median_step_ms'][i]:.1f}"]
        for v in variants:
            flop = s[v]["flop_ratio_vs_peft_lora"][i]
            cells += [
                f"{s[v]['median_step_ms'][i]:.1f}",
                timed(v, s[v]["ratio_vs_peft_lora"][i]),
                f"{s[v]['memory_mb'][i]:.1f}",
                "-" if flop is None else f"{flop:.2f}",
            ]
        cells += [timed(f"grouped {v}", r[i]) for v, r in res["grouped_over_dense"].items()]
        lines.append("| " + " | ".join(cells) + " |")
    spread = [x for r in res["by_experts"].values() for x in r["step_time_iqr_over_median"].values()]
    lines.append(f"\nstep-time spread over rounds (IQR / median): {min(spread):.1%} to {max(spread):.1%}")
    return "\n".join(lines + sweep_warnings(res))


def sweep_warnings(res: dict) -> list[str]:
    """The single run's warnings (:func:`moe_lora.bench.measure.ratio_warnings`), per expert count."""
    out = []
    for n, at in res["by_experts"].items():
        out += [f"experts={n}: {line.strip()}" for line in measure.ratio_warnings(at)]
    return out


def assemble(by_count: dict[int, dict], variants: list[str], a: argparse.Namespace) -> dict:
    return {
        "experts": list(by_count),
        "variants": variants,
        "series": series(by_count, variants),
        "grouped_over_dense": grouped_over_dense(by_count),
        "by_experts": {str(n): res for n, res in by_count.items()},
        "settings": measure.settings(a),
        "versions": measure.versions(),
    }


def run_sweep(a: argparse.Namespace) -> int:
    png = plot_path(a)  # before measuring: a run never ends in an "exists" error
    variants = measure.chosen_variants(a, sweep_variants())
    res = assemble(measure_counts(variants, a), variants, a)
    res["table"] = sweep_table(res)
    print(res["table"])
    png.parent.mkdir(parents=True, exist_ok=True)
    expert_sweep_png(res, png)
    res["plot"] = str(png)
    print(f"plot: {png}")
    if a.out:
        write_json_atomic(a.out, res)
        print(f"written: {a.out}")
    return 0
