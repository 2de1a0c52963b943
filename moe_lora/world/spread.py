"""The built-in world's measured cross-CPU spread: what ``make run`` gave under emulated CPUs.

torch's CPU kernels are chosen per instruction set (ATen's AVX2 / AVX-512 / scalar kernels, MKL's
GEMM branch) and per thread count, so another CPU pretrains the world model to other weights and a
run lands elsewhere (docs/reproducibility.md). ``scripts/numerics_spread.py`` runs the default
experiment once per emulated CPU (a forced ATen capability, an MKL branch) and writes
``spread.json`` beside this module from the runs' ``results.json``; the run summary then says where
a run of the same configuration sits against that spread. Nothing here is typed by hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from moe_lora.env import cpu_name

SPREAD_FILE = Path(__file__).with_name("spread.json")
# headline metrics whose spread the summary states (results.json "metrics" keys)
METRICS = ("cbqa_em_base", "cbqa_em", "instruction_em", "knowledge_retained")
# config keys that change no number: where a run writes, its label, how many threads it uses (the
# thread count is part of the numerics the spread samples, recorded per run instead)
_IGNORED = ("run_dir", "cache_dir", "label", "resume", "logger", "claims")
_NO_NUMBERS = (*_IGNORED, "recipe.threads", "hydra.")


def numerics() -> dict[str, Any]:
    """What decides this process's CPU numerics, for results.json: two runs that differ here may
    differ in their last bits from the first step on (the weights' initialisation included)."""
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "torch": str(torch.__version__),  # TorchVersion: not a primitive for OmegaConf
        "mode": os.environ.get("MOE_LORA_NUMERICS", "native"),  # moe_lora.env.set_numerics
    }


def config_leaves(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved config (results.json ``config``) as dotted leaves, without the keys that change
    no metric."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk({k: v for k, v in config.items() if k not in _IGNORED}, "")
    out.pop("recipe.threads", None)
    return out


def config_differences(config: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """Keys whose values differ between a config and the spread's (``config_leaves``), where both
    set one: a key on one side only, or null on one side, is a schema change since the spread was
    measured (a field added, or made null where it changes nothing), not another experiment."""
    leaves = config_leaves(config)
    return sorted(
        k
        for k in leaves.keys() & reference.keys()
        if leaves[k] is not None and reference[k] is not None and leaves[k] != reference[k]
    )


def number_overrides(overrides: list[str]) -> list[str]:
    """The command-line overrides that can change a run's numbers: not where it writes, its
    label, logger or thread count (sorted, so that the order on the command line does not count)."""
    return sorted(o for o in map(str, overrides) if not o.lstrip("+~").split("=")[0].startswith(_NO_NUMBERS))


def hydra_overrides() -> list[str] | None:
    """This Hydra job's :func:`number_overrides` (None outside a Hydra job), for results.json."""
    return number_overrides(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def run_overrides(run_dir: str | Path | None) -> list[str] | None:
    """A run folder's :func:`number_overrides`, from Hydra's ``.hydra/overrides.yaml``; None: no
    record of them."""
    path = Path(run_dir or "") / ".hydra" / "overrides.yaml"
    if not run_dir or not path.is_file():
        return None
    return number_overrides(list(OmegaConf.load(path)))


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``spread.json``: every run's metrics and numerics, the configuration and overrides they
    share, and per metric the min, max and range."""
    reference, overrides = config_leaves(runs[0]["config"]), runs[0]["overrides"]
    for r in runs[1:]:
        if diff := config_differences(r["config"], reference):
            raise ValueError(f"the runs of a spread must share one configuration; {r['name']} differs in {diff}")
        if r["overrides"] != overrides:
            raise ValueError(f"the runs of a spread must share their overrides; {r['name']} has {r['overrides']}")
    spread = {}
    for key in METRICS:
        values = [r["metrics"][key] for r in runs if r["metrics"].get(key) is not None]
        if values:
            spread[key] = {"min": min(values), "max": max(values), "range": max(values) - min(values), "n": len(values)}
    runs = [{k: v for k, v in r.items() if k != "config"} for r in runs]
    return {"config": reference, "overrides": overrides, "runs": runs, "spread": spread}


def load_spread(path: Path = SPREAD_FILE) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def spread_rows(results: dict[str, Any], spread: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Summary rows placing this run against the measured spread, for runs with the spread's own
    overrides only (another configuration has no measured spread, and the summary says so). The
    overrides decide, not the resolved config, so that a config field added since the spread was
    measured does not void it (tests/test_numerics.py checks that the defaults did not move)."""
    if spread is None or "config" not in results:
        return []
    overrides = results.get("overrides")
    if overrides is None:  # a re-evaluation's record: its run folder's command line
        overrides = run_overrides(results["config"].get("run_dir"))
    if overrides is None:
        return []  # no record of the command line: nothing to say
    if overrides != spread["overrides"]:
        shown = " ".join(overrides[:3]) + (" ..." if len(overrides) > 3 else "")
        return [("cross-CPU spread", f"not measured for this configuration ({shown}; docs/reproducibility.md)")]
    n = len(spread["runs"])
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
