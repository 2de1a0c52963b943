"""The GPU check's result: one JSON dict (every stage's record, the headline figures pulled out) and
its markdown tables; and the paper presets' GPU-memory estimates read from their YAML headers, so
the measured peak is set against what each preset promises, not against a number copied here."""

from __future__ import annotations

import platform
import re
from typing import Any

import torch

from moe_lora.recipes.compose import CONF_DIR

TARGET_S = 480  # the check should fit in 8 minutes on one H100 / H200
ESTIMATE = re.compile(r"about (\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))? GB")


def preset_estimates() -> list[dict[str, Any]]:
    """Per ``conf/experiment/*_paper.yaml``: the header's ``GPU`` paragraph and its first
    ``about A-B GB`` range (the adapter arms; a full fine-tuning note after it is kept in the text)."""
    out = []
    for path in sorted((CONF_DIR / "experiment").glob("*_paper.yaml")):
        header = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
        start = next((i for i, line in enumerate(header) if line.startswith("GPU")), None)
        if start is None:
            continue
        para = [header[start].removeprefix("GPU").strip()]
        for line in header[start + 1 :]:
            if not line or re.match(r"^[a-z]+\s{2,}", line) or line.startswith("Smoke"):
                break  # the next "Needs" entry or the end of the header
            para.append(line)
        text = " ".join(para)
        m = ESTIMATE.search(text)
        low, high = (float(m.group(1)), float(m.group(2) or m.group(1))) if m else (None, None)
        out.append({"preset": path.stem, "estimate": text, "low_gb": low, "high_gb": high})
    return out


def verdict(peak_gb: float, low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "no estimate"
    return "below" if peak_gb < low else "above" if peak_gb > high else "within"


def compare_estimates(peak_bytes: int, applies: bool) -> dict[str, Any]:
    """The training peak (decimal GB, as the headers write them) against every preset's estimate;
    ``applies``: false for ``--tiny``, whose shapes are not the presets' (recorded, not judged)."""
    peak_gb = peak_bytes / 1e9
    rows = []
    for est in preset_estimates():
        v = verdict(peak_gb, est["low_gb"], est["high_gb"]) if applies else "not comparable (tiny shapes)"
        rows.append({**est, "measured_gb": peak_gb, "verdict": v})
    return {"measured_gb": peak_gb, "presets": rows}


def machine() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }


def summary(mode, stages: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Everything, plus the headline figures: tokens/s, peaks, grouped/dense, resume equality."""
    train = {n: stages[n] for n in ("train_reference", "train_resume", "fsdp_runner", "fsdp_one_rank") if n in stages}
    return {
        "mode": mode.name,
        "notes": mode.notes,
        "machine": machine(),
        "total_seconds": seconds,
        "passed": [n for n, s in stages.items() if s["ok"]],
        "failures": [f"{n}: {s['reason']}" for n, s in stages.items() if not s["ok"]],
        "tokens_per_s": {n: s.get("tokens_per_s") for n, s in train.items()},
        "peak_mem_bytes": {n: s.get("peak_mem_bytes") for n, s in train.items()},
        "grouped_over_dense": {
            n: s.get("grouped_over_dense") for n, s in stages.items() if n.startswith(("bench_", "sweep_"))
        },
        "resume": stages.get("train_resume", {}).get("comparison"),
        "stages": stages,
        "settings": {"mode": mode.name, "bench": mode.bench, "sweep": mode.sweep, "train": mode.train},
    }


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def stage_table(res: dict[str, Any]) -> list[str]:
    lines = ["| stage | result | seconds |", "|---|---|---:|"]
    for name, s in res["stages"].items():
        result = "pass" if s["ok"] else f"FAIL: {s['reason']}"
        lines.append(f"| {name} | {result} | {s['seconds']:.1f} |")
    return lines


def bench_tables(res: dict[str, Any]) -> list[str]:
    lines = []
    for name, s in res["stages"].items():
        if not (name.startswith("bench_") and s["ok"]):
            continue
        lines += [f"\n### {name} (tokens/s = batch x seq / median step)\n"]
        lines += ["| variant | step ms | tokens/s | x peft LoRA | memory MB |", "|---|---:|---:|---:|---:|"]
        for v, r in s["variants"].items():
            ratio = (
                "-" if r["x_peft_lora"] is None else f"{r['x_peft_lora']:.2f}" + ("*" if r.get("unreliable") else "")
            )
            lines.append(f"| {v} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {ratio} | {r['memory_mb']:.0f} |")
        shown = s.get("ratios_shown", True)  # too few rounds: no step-time ratio (see the warning)
        lines += [
            f"\ngrouped / dense ({k}): {f'{r:.2f}x' if shown else '-'}" for k, r in s["grouped_over_dense"].items()
        ]
        lines += [f"\n{line.strip()}" for line in s.get("warnings", [])]
    return lines


def train_table(res: dict[str, Any]) -> list[str]:
    lines = ["| run | tokens/s | peak GB | final loss | ranks | strategy |", "|---|---:|---:|---:|---:|---|"]
    for n in ("train_reference", "train_resume", "fsdp_runner", "fsdp_one_rank"):
        s = res["stages"].get(n, {})
        if s.get("ok"):
            peak = s["peak_mem_bytes"] / 1e9 if s.get("peak_mem_bytes") else None
            strategy = s.get("strategy") or ("fsdp (direct)" if n == "fsdp_one_rank" else "-")
            lines.append(
                f"| {n} | {_fmt(s.get('tokens_per_s'), ',.0f')} | {_fmt(peak, '.2f')} | "
                f"{_fmt(s.get('final_loss'), '.4f')} | {s.get('ranks') or 1} | {strategy} |"
            )
    return lines


def resume_lines(res: dict[str, Any]) -> list[str]:
    cmp = res.get("resume")
    if not cmp:
        return ["no comparison (a training stage failed)"]
    return [
        f"- bitwise: {'yes' if cmp['bitwise'] else 'no'} (adapter file {cmp['adapter_bitwise']}, routing log "
        f"{cmp['routing_bitwise']}, loss lines {cmp['loss_lines_equal']}, metrics {cmp['metrics_equal']})",
        f"- largest difference: loss {cmp['max_loss_rel_diff']:.2e} relative, metrics "
        f"{cmp['max_metric_rel_diff']:.2e} relative; tolerance {cmp['rtol']}: "
        f"{'within' if cmp['within_tolerance'] else 'OUTSIDE'}",
    ]


def memory_table(res: dict[str, Any]) -> list[str]:
    s = res["stages"].get("memory_vs_presets", {})
    if "presets" not in s:
        return ["no comparison (the training reference failed)"]
    lines = ["| preset | header estimate GB | measured peak GB | verdict |", "|---|---:|---:|---|"]
    for r in s["presets"]:
        est = "-" if r["low_gb"] is None else f"{r['low_gb']:g}-{r['high_gb']:g}"
        lines.append(f"| {r['preset']} | {est} | {r['measured_gb']:.2f} | {r['verdict']} |")
    texts = dict.fromkeys(r["estimate"] for r in s["presets"])  # each distinct header once
    return [*lines, "", *(f"> {t}" for t in texts)]


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    where = m["gpu"] or f"CPU ({m['machine']}, {m['threads']} threads)"
    lines = [f"# GPU check ({res['mode']} mode) on {where}, torch {m['torch']}", ""]
    lines += [f"_{n}_" for n in res["notes"]]
    over = " (over the 8-minute target)" if res["mode"] == "gpu" and res["total_seconds"] > TARGET_S else ""
    lines += ["", f"total {res['total_seconds']:.0f} s{over}", "", *stage_table(res), *bench_tables(res)]
    sweep = res["stages"].get("sweep_0.5b", {})
    if sweep.get("ok"):
        lines += ["", "### expert sweep (0.5b shape)", "", sweep["table"], "", f"plot: {sweep['plot']}"]
    lines += ["", "### training: experiment=loramoe_forgetting_paper +arm=loramoe_lbc", "", *train_table(res)]
    lines += ["", "peak: the CUDA allocator's peak of the run (on a CPU: this process's peak RSS)"]
    lines += ["", "### resume after SIGKILL against the uninterrupted run", "", *resume_lines(res)]
    lines += ["", "### training peak against the paper presets' estimates", "", *memory_table(res)]
    if res["failures"]:
        lines += ["", "### failures", "", *(f"- {f}" for f in res["failures"])]
    return "\n".join(lines) + "\n"
