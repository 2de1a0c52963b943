"""The body of a results page generated from a ``moe-lora bench --out`` JSON (:mod:`moe_lora.report.pages`
writes the header and the file): the settings and versions the JSON records, one row per variant
(step time, memory and matmul FLOPs against peft LoRA with the spread of the rounds), and the other
ratios the run computed; or, for an expert sweep (``--experts 8,16,...``), one row per count and
variant. Every figure is read from the JSON or computed from figures in it (a memory ratio of a
sweep), so a page says what the run measured and nothing else. The bench's own table code is not
imported: report/ reads result files only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RUN, SWEEP = "variant table", "expert sweep"
# keys each shape's renderer reads (a JSON without them is not one `moe-lora bench --out` writes)
RUN_KEYS = ("median_step_ms", "memory_mb", "gflops_per_step", "ratio_vs_peft_lora", "step_time_iqr_over_median")
SWEEP_KEYS = ("experts", "variants", "series", "by_experts")
SKIPPED = ("out", "overwrite", "plot")  # where the files went, not what was measured


def kind(data: Any, path: Path | str) -> str:
    """RUN or SWEEP; a ValueError naming ``path`` for anything else."""
    keys = data.keys() if isinstance(data, dict) else ()
    if "settings" in keys and "versions" in keys:
        if all(k in keys for k in SWEEP_KEYS):
            return SWEEP
        if all(k in keys for k in RUN_KEYS):
            return RUN
    if "rows" in keys:
        raise ValueError(f"{path}: a `--experts-vs-peft` JSON; pages render the variant table or an expert sweep")
    raise ValueError(f"{path}: not a `moe-lora bench --out` JSON (no settings, versions and {RUN_KEYS[0]} or experts)")


def load(path: Path) -> dict[str, Any]:
    """The bench JSON at ``path``, checked to be one (one-line ValueError naming the file)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    kind(data, path)
    return data


def _cell(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text.replace("|", "\\|")


def settings_table(data: dict[str, Any]) -> str:
    """The flags as run (shape filled in, threads, machine) and the library versions, as recorded."""
    rows = [(k, v) for k, v in data["settings"].items() if k not in SKIPPED and v not in (None, "")]
    rows += [(f"{k} version", v) for k, v in data["versions"].items()]
    return "\n".join(["| setting | value |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows)]) + "\n"


def _few(res: dict[str, Any]) -> bool:
    """Fewer rounds than the bench trusts (shown only because of ``--force``)."""
    return res.get("rounds", 0) < res.get("min_rounds", 0)


def _timed(res: dict[str, Any], label: str, ratio: float, digits: int = 2, unit: str = "") -> str:
    """A step-time ratio as the bench prints it: "-" when the run withheld ratios, ``*`` when unreliable."""
    if not res.get("ratios_shown", True):
        return "-"
    return f"{ratio:.{digits}f}{unit}" + ("*" if _few(res) or label in res.get("unreliable", {}) else "")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _interval(res: dict[str, Any], v: str) -> str:
    pair = res.get("ratio_interval_vs_peft_lora", {}).get(v)
    return "-" if pair is None or not res.get("ratios_shown", True) else f"[{pair[0]:.2f}, {pair[1]:.2f}]"


def variants_table(res: dict[str, Any]) -> str:
    """One row per variant: median step, x peft LoRA (with the 95% interval of the per-round ratio),
    memory and GFLOP with their ratios, and the spread of the rounds."""
    ms, mb, gf = res["median_step_ms"], res["memory_mb"], res["gflops_per_step"]
    ranges = res.get("step_time_range_over_median", {})
    head = "| variant | step ms | x peft LoRA | 95% interval | memory MB | x peft LoRA | GFLOP | x peft LoRA |"
    head += " IQR / median | (max - min) / median |"
    lines = [head, "|---|" + "---:|" * (head.count(" |") - 1)]
    for v in ms:
        ratio = res["ratio_vs_peft_lora"].get(v, ms[v] / ms["peft_lora"])
        mratio = res.get("memory_ratio_vs_peft_lora", {}).get(v, mb[v] / mb["peft_lora"])
        flops = [f"{gf[v]:.1f}", f"{gf[v] / gf['peft_lora']:.2f}"] if v in gf and "peft_lora" in gf else ["-", "-"]
        cells = [v, f"{ms[v]:.1f}", _timed(res, v, ratio), _interval(res, v), f"{mb[v]:.1f}", f"{mratio:.2f}"]
        cells += [*flops, _pct(res["step_time_iqr_over_median"].get(v)), _pct(ranges.get(v))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def warnings(res: dict[str, Any], prefix: str = "") -> list[str]:
    """The run's judgement of its step-time ratios: withheld (too few rounds) or each flagged one and why."""
    if not res.get("ratios_shown", True):
        return [f"- {prefix}step-time ratios withheld: {res.get('rounds')} rounds, too few to judge their spread"]
    lines = [f"- {prefix}every step-time ratio is marked *: {res['rounds']} rounds (forced)"] if _few(res) else []
    return lines + [f"- {prefix}* {label}: {why}" for label, why in res.get("unreliable", {}).items()]


def other_ratios(res: dict[str, Any]) -> list[str]:
    """The run's ratios beside the table, labelled as `moe-lora bench` prints them."""
    lines = [
        f"- loop reference / ours ({k}): {_timed(res, f'loop {k}', r, unit='x')}"
        for k, r in res.get("loop_reference_over_ours", {}).items()
    ]
    lines += [
        f"- compiled {k.removesuffix('_compiled')} / eager peft LoRA: {_timed(res, k, r, unit='x')}"
        for k, r in res.get("compiled_vs_eager_peft_lora", {}).items()
    ]
    lines += [
        f"- top-k through the grouped path / dense masked gate ({k}): {_timed(res, f'grouped {k}', r, unit='x')}"
        for k, r in res.get("grouped_over_dense", {}).items()
    ]
    if "telemetry_overhead" in res:
        overhead = _timed(res, "telemetry", res["telemetry_overhead"], digits=3, unit="x")
        lines.append(f"- routing statistics + aux losses on / off (loramoe): {overhead}")
    return lines


def run_body(res: dict[str, Any], level: str = "##") -> list[str]:
    lines = [
        f"{level} Step time, memory and FLOPs per variant",
        "",
        f"Median training step (forward, backward, AdamW) over {res.get('rounds', '?')} interleaved rounds; every "
        "ratio is against peft LoRA measured in the same run; GFLOP counts the matmuls of one step; the last two "
        "columns are the spread of the variant's rounds. A step-time ratio marked * is one the run judged "
        "unreliable (listed under the table).",
        "",
        variants_table(res),
    ]
    if flagged := warnings(res):
        lines += ["Step-time ratios the run flagged:", "", *flagged, ""]
    if extra := other_ratios(res):
        lines += [f"{level} Other step-time ratios of the run", "", *extra, ""]
    return lines


def sweep_table(res: dict[str, Any]) -> str:
    """One row per expert count and variant, each count's ratios against its own peft LoRA."""
    s = res["series"]
    head = "| experts | variant | step ms | x peft LoRA | memory MB | x peft LoRA | FLOP x peft LoRA | IQR / median |"
    lines = [head, "|---:|---|" + "---:|" * (head.count(" |") - 2)]
    for i, n in enumerate(res["experts"]):
        at = res["by_experts"][str(n)]
        for v in res["variants"]:
            row, flop = s[v], s[v]["flop_ratio_vs_peft_lora"][i]
            cells = [str(n), v, f"{row['median_step_ms'][i]:.1f}", _timed(at, v, row["ratio_vs_peft_lora"][i])]
            cells += [f"{row['memory_mb'][i]:.1f}", f"{row['memory_mb'][i] / s['peft_lora']['memory_mb'][i]:.2f}"]
            cells += ["-" if flop is None else f"{flop:.2f}", _pct(at["step_time_iqr_over_median"].get(v))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def grouped_table(res: dict[str, Any]) -> str:
    pairs = res.get("grouped_over_dense", {})
    lines = ["| experts | " + " | ".join(pairs) + " |", "|---:|" + "---:|" * len(pairs)]
    for i, n in enumerate(res["experts"]):
        at = res["by_experts"][str(n)]
        lines.append(f"| {n} | " + " | ".join(_timed(at, f"grouped {v}", r[i]) for v, r in pairs.items()) + " |")
    return "\n".join(lines) + "\n"


def sweep_body(res: dict[str, Any]) -> list[str]:
    counts = ", ".join(map(str, res["experts"]))
    lines = [
        "## Per expert count",
        "",
        f"Every count ({counts}) is one interleaved measurement of the variants with a peft LoRA of its own, all "
        "in one process; each ratio is against that count's peft LoRA. FLOPs count the matmuls of one step. A "
        "step-time ratio marked * is one the run judged unreliable (listed below).",
        "",
        sweep_table(res),
    ]
    if res.get("grouped_over_dense"):
        lines += ["## Step time of the grouped path over the dense masked gate", "", grouped_table(res)]
    flagged = [w for n, at in res["by_experts"].items() for w in warnings(at, f"experts={n}: ")]
    if flagged:
        lines += ["Step-time ratios the run flagged:", "", *flagged, ""]
    return lines


def body(data: dict[str, Any]) -> str:
    """The page below its header: settings and versions, then the measured tables."""
    lines = ["## Settings and versions", "", settings_table(data)]
    if kind(data, "bench.json") == SWEEP:
        lines += sweep_body(data)
    else:
        lines += run_body(data)
        if "large" in data:
            big = data["large"]["settings"]
            lines += [
                f"## The `--large` shape: {big.get('model')}, {big.get('dtype')}, sequence {big.get('seq')}",
                "",
                "Measured in the same process after the tables above (the variants share one copy of the frozen base).",
                "",
                "### Settings and versions",
                "",
                settings_table(data["large"]),
                *run_body(data["large"], "###"),
            ]
    return "\n".join(lines)


def index_cells(data: dict[str, Any]) -> list[str]:
    """What the index says of a bench page: kind, model, device and dtype, rounds, threads, torch."""
    st = data["settings"]
    what = kind(data, "bench.json")
    if what == SWEEP:
        what += f" (experts {', '.join(map(str, data['experts']))})"
    return [
        what,
        str(st.get("model", "-")),
        f"{st.get('device', '-')}, {st.get('dtype', '-')}",
        str(st.get("rounds", "-")),
        str(st.get("threads", "-")),
        str(data["versions"].get("torch", "-")),
    ]
