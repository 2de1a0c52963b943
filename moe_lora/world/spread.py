"""The built-in world's measured cross-CPU spread: what ``make run`` gave under emulated CPUs.

torch's CPU kernels are chosen per instruction set (ATen's AVX2 / AVX-512 / scalar kernels, MKL's
GEMM branch) and per thread count, so another CPU pretrains the world model to other weights and a
run lands elsewhere (docs/reproducibility.md). ``scripts/numerics_spread.py`` runs the default
experiment once per emulated CPU (a forced ATen capability, an MKL branch) and writes
``spread.json`` beside this module from the runs' ``results.json``; the run summary then says where
a run of the same configuration sits against that spread. Nothing here is typed by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

SPREAD_FILE = Path(__file__).with_name("spread.json")
# headline metrics whose spread the summary states (results.json "metrics" keys)
METRICS = ("cbqa_em_base", "cbqa_em", "instruction_em", "knowledge_retained")
# config keys that change no number: where a run writes, its label, how many threads it uses (the
# thread count is part of the numerics the spread samples, recorded per run instead)
_IGNORED = ("run_dir", "cache_dir", "label", "resume", "logger", "claims")


def numerics() -> dict[str, Any]:
    """What decides this process's CPU numerics, for results.json: two runs that differ here may
    differ in their last bits from the first step on (the weights' initialisation included)."""
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "torch": str(torch.__version__),  # TorchVersion: not a primitive for OmegaConf
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def config_fingerprint(config: dict[str, Any]) -> str:
    """Hash of a resolved config (results.json ``config``) without the keys that change no metric."""
    kept = {k: v for k, v in config.items() if k not in _IGNORED}
    if isinstance(kept.get("recipe"), dict):
        kept["recipe"] = {k: v for k, v in kept["recipe"].items() if k != "threads"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``spread.json``: every run's metrics and numerics, and per metric the min, max and range."""
    prints = {r["fingerprint"] for r in runs}
    if len(prints) != 1:
        raise ValueError(f"the runs of a spread must share one configuration; fingerprints {sorted(prints)}")
    spread = {}
    for key in METRICS:
        values = [r["metrics"][key] for r in runs if r["metrics"].get(key) is not None]
        if values:
            spread[key] = {"min": min(values), "max": max(values), "range": max(values) - min(values), "n": len(values)}
    return {"fingerprint": prints.pop(), "runs": runs, "spread": spread}


def load_spread(path: Path = SPREAD_FILE) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def spread_rows(results: dict[str, Any], spread: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Summary rows placing this run against the measured spread, for the configuration it was
    measured on only (another configuration has no measured spread, and the summary says so)."""
    if spread is None or "config" not in results:
        return []
    n = len(spread["runs"])
    if config_fingerprint(results["config"]) != spread["fingerprint"]:
        return [("cross-CPU spread", f"not measured for this configuration (docs/reproducibility.md; {n} runs)")]
    rows = [("cross-CPU spread", f"{n} emulated CPUs, same configuration (docs/reproducibility.md)")]
    for key, s in spread["spread"].items():
        value = results["metrics"].get(key)
        if value is None:
            continue
        rows.append((f"  {key}", f"{value:.3f} vs {s['min']:.3f}..{s['max']:.3f}: {_place(value, s)}"))
    return rows


def _place(value: float, s: dict[str, float]) -> str:
    if value < s["min"]:
        return f"{s['min'] - value:.3f} below it"
    if value > s["max"]:
        return f"{value - s['max']:.3f} above it"
    return "within it"


def render_table(spread: dict[str, Any]) -> str:
    """The Markdown table of docs/reproducibility.md: one row per emulated CPU, then the range."""
    head = ["emulated CPU", "ATen kernels", "MKL CNR", "threads", *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in spread["runs"]:
        n = r["numerics"]
        cells = [r["name"], n["capability"], n["mkl_cbwr"] or "off", str(n["threads"])]
        cells += [_cell(r["metrics"].get(k)) for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    ranges = [_cell(spread["spread"][k]["range"]) if k in spread["spread"] else "-" for k in METRICS]
    lines.append("| **range (max - min)** | | | | " + " | ".join(ranges) + " |")
    return "\n".join(lines)


def _cell(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
