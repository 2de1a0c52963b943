"""`moe-lora bench`: training-step time and memory of every variant against peft's LoRA.

All variants live in one process and are interleaved over the rounds, so that drift of the
machine (other load, frequency) hits them alike; the figure is the median step (forward, backward,
AdamW step). Memory on CPU is the bytes saved for backward (saved-tensor hooks) plus parameters,
gradients and optimiser state; on a GPU it is the peak allocated memory of a step above what was
allocated before it, plus the variant's own weights and optimiser state. Ratios are against peft
LoRA measured in the same run; nothing is compared with numbers from elsewhere. The variants share
one copy of the frozen base weights (each has its own modules and adapters), so a 7B shape needs
its 13.5 GB once, not once per variant; each memory figure still counts the base, as the variant
alone would.

Shapes come from ``conf/model/`` (``--model NAME``: its family, layers, widths, heads, kv heads and
vocabulary), with random weights; ``--hidden`` etc. override single fields. ``--size`` names three:
``tiny`` (default; the built-in world model's Llama widened to hidden 256, FFN 688, vocab 2000),
``0.5b`` (``qwen2_5_0_5b``) and ``7b`` (``llama2_7b``; about 14 GB in bf16). ``--modules`` takes what
``adapter.target_modules`` takes (``all``, ``attention``, ``ffn``, roles or names), resolved on the
model by ``structure.py``; peft's LoRA gets the same linears by name. On a GPU the default run also
measures the ``0.5b`` shape in bfloat16 at sequence 512 for the core variants (``--large none``
skips it, ``--large 7b`` or a model name picks another); its results are under ``"large"`` in the JSON.

``--experts 4,8,16,32,64`` (a list) measures the cost against the expert count instead
(:mod:`moe_lora.bench.sweep`): every chosen variant at every count in this process, peft LoRA beside
each count, a table, a PNG (:mod:`moe_lora.bench.plot`) and the JSON. ``--top-k K`` sets ``top_k``
of the variants that route top-k (their defaults do: MoLA, AdaMoE, and every ``_grouped`` one);
soft-routed variants stay soft, since a top-k LoRAMoE would be another method.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from moe_lora.bench.experts_vs_peft import DEFAULT_COUNTS, from_bench
from moe_lora.bench.measure import (  # adapter_config, build, make_batch: the variant tests build cases here
    LOOPS,
    MIN_ROUNDS,
    REFERENCE,
    adapted_variants,
    adapter_config,
    build,
    chosen_variants,
    grouped_variants,
    make_batch,
    measure,
    ratio_warnings,
    refuse_existing,
    report,
)
from moe_lora.bench.sweep import run_sweep
from moe_lora.errors import ConfigError
from moe_lora.recipes.compose import load_config
from moe_lora.tracking import write_json_atomic

__all__ = ["adapted_variants", "adapter_config", "build", "large_args", "main", "make_batch", "parse", "table"]

SIZES = {  # --size: a conf/model config and the fields the benchmark changes in it
    "tiny": ("tiny_world", {"hidden": 256, "ffn": 688, "vocab": 2000}),
    "0.5b": ("qwen2_5_0_5b", {}),
    "7b": ("llama2_7b", {}),
}
SHAPE = {
    "hidden": "hidden_size",
    "layers": "num_layers",
    "heads": "num_heads",
    "kv_heads": "num_kv_heads",
    "ffn": "intermediate_size",
    "vocab": "vocab_size",
}  # flag -> ModelConfig field
LARGE_VARIANTS = ["peft_lora", "lora", "loramoe", "mola", "mola_grouped", "hydralora", "loop_loramoe"]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moe-lora bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", choices=list(SIZES), help="model shape (random weights)")
    p.add_argument("--model", default=None, help="a conf/model config whose shape to use (instead of --size)")
    for key in SHAPE:
        p.add_argument(
            f"--{key.replace('_', '-')}", dest=key, type=int, default=None, help=f"override the shape's {key}"
        )
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--experts",
        type=expert_counts,
        default=[8],
        help="experts per adapted linear; a comma-separated list (4,8,16) measures every count (a sweep)",
    )
    p.add_argument("--top-k", dest="top_k", type=int, default=None, help="top_k of the top-k routed variants")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20, help="timed steps per variant, interleaved (default 20)")
    p.add_argument(
        "--force",
        action="store_true",
        help="print step-time ratios even below 5 rounds (flagged *); without it they are left out",
    )
    p.add_argument(
        "--modules",
        default="all",
        help="adapter.target_modules: 'all', 'ffn', 'attention' or comma-separated roles / module names",
    )
    p.add_argument(
        "--variants",
        default="",
        help="comma-separated subset (default: all; a sweep: those with experts + mola_grouped)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile every model (whole model)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here (a new file)")
    p.add_argument("--overwrite", action="store_true", help="let --out (and --plot) replace an existing file")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="expert sweep: write the PNG here (default: beside --out as <stem>.png, else outputs/bench/<time>_experts.png)",
    )
    p.add_argument(
        "--experts-vs-peft",
        dest="experts_vs_peft",
        nargs="?",
        const=DEFAULT_COUNTS,
        default=None,
        metavar="COUNTS",
        help="instead: LoRA on the routed experts of a Mixtral-shaped MoE against peft's target_parameters "
        f"at these expert counts (default {DEFAULT_COUNTS}; moe_lora/bench/experts_vs_peft.py, its own shape)",
    )
    p.add_argument(
        "--large",
        default=None,
        help="also measure this size or conf/model config in bfloat16 at sequence 512 (default: 0.5b on "
        "a GPU, none on CPU)",
    )
    a = p.parse_args(argv)
    a.model, a.model_cfg = with_shape(a, *SIZES[a.size]) if a.model is None else with_shape(a, a.model, {})
    a.sweep = len(a.experts) > 1
    if a.sweep and a.large not in (None, "none"):
        raise ConfigError(
            f"--large {a.large} with --experts {','.join(map(str, a.experts))}: the sweep runs one shape; "
            f"pass --size {a.large} --dtype bfloat16 --seq 512 instead"
        )
    if a.top_k is not None and a.top_k < 1:
        raise ConfigError(f"--top-k {a.top_k}: must be >= 1")
    if a.large is None:
        a.large = "0.5b" if a.device.startswith("cuda") and not a.sweep else "none"
    if not a.sweep:  # one count: an int, as the settings have always recorded it
        a.experts = a.experts[0]
    return a


def expert_counts(text: str) -> list[int]:
    """``--experts``: one count or a comma-separated list of distinct positive counts, in order."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int or a comma-separated list of ints") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct counts >= 1")
    return sorted(counts)


def model_shape(name: str):
    """The ModelConfig of ``conf/model/<name>.yaml`` (its architecture fields: no download). No
    adapter: the default one stops on an MoE base's fused experts, and the shape is all that is read."""
    return load_config([f"model={name}", "adapter=none"], check_files=False).model


def with_shape(a: argparse.Namespace, name: str, changes: dict[str, int]):
    """(model name, its ModelConfig with ``changes`` and the shape flags applied); the flags are
    filled in from the result, so the JSON's settings say the shape that ran."""
    cfg = model_shape(name)
    values = {
        k: getattr(a, k) if getattr(a, k, None) is not None else changes.get(k, getattr(cfg, f))
        for k, f in SHAPE.items()
    }
    kv = cfg.num_kv_heads
    if getattr(a, "heads", None) is not None and getattr(a, "kv_heads", None) is None:  # keep MHA / a dividing GQA
        values["kv_heads"] = a.heads if kv in (None, cfg.num_heads) or a.heads % kv else kv
    if values["vocab"] is None:
        raise ConfigError(f"--model {name}: its config has no vocab_size; pass --vocab")
    cfg = replace(cfg, **{SHAPE[k]: v for k, v in values.items()})
    if "hidden" in changes or getattr(a, "hidden", None) is not None or getattr(a, "heads", None) is not None:
        cfg = replace(cfg, head_dim=None)  # a changed width or head count: head_dim = hidden / heads
    vars(a).update(values)
    return name, cfg


def large_args(a: argparse.Namespace) -> argparse.Namespace:
    """The same settings at the ``--large`` shape (a size or a model name), bfloat16, sequence 512."""
    big = argparse.Namespace(**{**vars(a), **dict.fromkeys(SHAPE), "dtype": "bfloat16", "seq": 512})
    big.model, big.model_cfg = with_shape(big, *SIZES[a.large]) if a.large in SIZES else with_shape(big, a.large, {})
    big.size = a.large
    return big


def table(res: dict) -> str:
    """The printed result. Step-time ratios are "-" below ``measure.MIN_ROUNDS`` rounds (unless
    ``--force``) and marked ``*`` where ``res["unreliable"]`` says why they cannot be trusted."""
    ms, mb = res["median_step_ms"], res["memory_mb"]
    gf = res["gflops_per_step"]
    flags, shown = res.get("unreliable", {}), res.get("ratios_shown", True)
    few = res.get("rounds", MIN_ROUNDS) < MIN_ROUNDS  # shown only with --force: every one flagged

    def timed(label: str, ratio: float, digits: int = 2, width: int = 7, unit: str = "") -> str:
        text = f"{ratio:.{digits}f}{unit}" + ("*" if few or label in flags else "") if shown else "-"
        return f"{text:>{width}}"

    rows = [f"{'variant':<30} {'step ms':>8} {'x peft':>7} {'memory MB':>10} {'x peft':>7} {'GFLOP':>7} {'x peft':>7}"]
    for v in ms:
        ratio = res["ratio_vs_peft_lora"].get(v, ms[v] / ms["peft_lora"])
        mratio = res["memory_ratio_vs_peft_lora"].get(v, mb[v] / mb["peft_lora"])
        flops = f"{gf[v]:>7.1f} {gf[v] / gf['peft_lora']:>7.2f}" if v in gf else f"{'-':>7} {'-':>7}"
        rows.append(f"{v:<30} {ms[v]:>8.1f} {timed(v, ratio)} {mb[v]:>10.1f} {mratio:>7.2f} {flops}")
    rows.append("")
    spread = res["step_time_iqr_over_median"]
    rows.append(
        f"step-time spread over rounds (IQR / median): {min(spread.values()):.1%} to {max(spread.values()):.1%}"
    )
    rows += [
        f"loop reference / ours ({k}): {timed(f'loop {k}', r, width=0, unit='x')}"
        for k, r in res["loop_reference_over_ours"].items()
    ]
    rows += [
        f"compiled {k.removesuffix('_compiled')} / eager peft LoRA: {timed(k, r, width=0, unit='x')}"
        for k, r in res.get("compiled_vs_eager_peft_lora", {}).items()
    ]
    rows += [
        f"top-k through the grouped path / dense masked gate ({k}): {timed(f'grouped {k}', r, width=0, unit='x')}"
        for k, r in res.get("grouped_over_dense", {}).items()
    ]
    if "telemetry_overhead" in res:
        overhead = timed("telemetry", res["telemetry_overhead"], digits=3, width=0, unit="x")
        rows.append(f"routing statistics + aux losses on / off (loramoe): {overhead}")
    return "\n".join(rows + ratio_warnings(res))


def main(argv: list[str]) -> int:
    a = parse(argv)
    refuse_existing(a.out, "--out", a.overwrite)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.experts_vs_peft:
        return from_bench(argv)
    if a.sweep:
        return run_sweep(a)
    grouped = grouped_variants()
    default = [*REFERENCE, *adapted_variants(), "loramoe_no_telemetry", *grouped, "loramoe_compiled", *LOOPS]
    res = report(measure(chosen_variants(a, default), a), a)
    print(table(res))
    if a.large != "none":
        big = large_args(a)
        print(
            f"\n{a.large}-shaped model ({big.model}), bfloat16, sequence {big.seq} (the variants share one copy of the frozen base):"
        )
        res["large"] = report(measure([v for v in LARGE_VARIANTS if v != "mola_grouped" or grouped], big), big)
        print(table(res["large"]))
    if a.out:
        write_json_atomic(a.out, res)
        print(f"written: {a.out}")
    return 0
