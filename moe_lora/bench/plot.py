"""The expert sweep as a PNG (matplotlib, Agg: no display needed), drawn from the sweep's JSON
dict alone, so a saved result can be drawn again without measuring.

Three panels against the expert count (log2 axis): step time; step time and matmul FLOPs, each
over peft LoRA's (solid and dashed, one colour per variant), which shows at a glance whether the
time follows the arithmetic or something else (launches, gathers, memory traffic); and memory.
"""

from __future__ import annotations

from pathlib import Path


def expert_sweep_png(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, s = res["experts"], res["series"]
    fig, (time_ax, ratio_ax, mem_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ours = [v for v in res["variants"] if v != "peft_lora"]
    for ax, key in ((time_ax, "median_step_ms"), (mem_ax, "memory_mb")):
        ax.plot(xs, s["peft_lora"][key], color="grey", linestyle=":", marker=".", label="peft_lora")
    ratio_ax.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="peft_lora")
    for i, v in enumerate(ours):
        c = colours[i % len(colours)]
        time_ax.plot(xs, s[v]["median_step_ms"], color=c, marker="o", label=v)
        mem_ax.plot(xs, s[v]["memory_mb"], color=c, marker="o", label=v)
        ratio_ax.plot(xs, s[v]["ratio_vs_peft_lora"], color=c, marker="o", label=f"{v} time")
        flops = [(x, f) for x, f in zip(xs, s[v]["flop_ratio_vs_peft_lora"], strict=True) if f is not None]
        if flops:
            ratio_ax.plot(*zip(*flops, strict=True), color=c, linestyle="--", marker="x", label=f"{v} FLOPs")
    cfg = res["settings"]
    time_ax.set(ylabel="median training step (ms)", title="step time")
    ratio_ax.set(ylabel="x peft LoRA (same run)", title="time (solid) and matmul FLOPs (dashed) over peft LoRA")
    mem_ax.set(ylabel="memory (MB)", title="memory of a step")
    for ax in (time_ax, ratio_ax, mem_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("experts per adapted linear")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{cfg['model']} shape, {cfg['dtype']}, {cfg['device']}, batch {cfg['batch']} x seq {cfg['seq']}, "
        f"rank {cfg['rank']}, top-k {cfg['top_k'] or 'as each variant'}, {cfg['rounds']} rounds, {cfg['threads']} threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
