"""``python scripts/gpu_check.py``: one command that shows on a CUDA machine with no internet that
the project's GPU paths work, and what they cost (aimed at under 8 minutes on one H100 / H200).

Stages, each printed as it starts and ends, each recorded pass / fail with its reason (a failing
stage never stops the ones that do not need it; the exit code is non-zero if any failed):

1. ``bench_0.5b``, ``bench_7b``: ``moe-lora bench`` on the ``0.5b`` and ``7b`` shapes, bf16,
   sequence 512, for peft LoRA and the core variants (:data:`VARIANTS`);
2. ``sweep_0.5b``: the expert sweep (:mod:`.sweep`) on the ``0.5b`` shape;
3. ``checkpoint``: a random-weight LLaMA-2-7B-shaped checkpoint (bf16, ``save_pretrained``) with a
   fixture tokenizer, and fixture files of ``data=cbqa_instruct_hub``'s sources (:mod:`.fixtures`);
4. ``train_reference``, ``train_killed``, ``train_resume``: ``experiment=loramoe_forgetting_paper
   +arm=loramoe_lbc`` on them, uninterrupted, SIGKILLed after a checkpoint, resumed and compared
   (:mod:`.train_check`);
5. ``fsdp_runner``: the recipe under ``recipe.strategy=fsdp``; ``fsdp_one_rank``: FSDP2 itself on
   a process group of one (:mod:`.fsdp_check`);
6. ``memory_vs_presets``: the training peak against every ``conf/experiment/*_paper.yaml`` header's
   GPU-memory estimate;
7. ``moe_experts``: LoRA on the attention and the routed experts of a random Mixtral-shaped
   checkpoint (``conf/model/mixtral_8x7b.yaml`` narrowed: 8 experts, top-2, bf16 base, float32
   adapters) trained through the CLI on the check's data; it passes when every layer's expert
   adapters trained and the expert pairs ran through the grouped GEMMs on the GPU (CSR on the CPU).

Written to ``--out DIR`` (a new folder; default ``outputs/gpu_check/<time>``): ``gpu_check.json``
(every figure, settings, pass / fail), ``gpu_check.md`` (the tables), the bench JSONs and the sweep
PNG. ``--tiny`` runs every stage on the CPU with tiny shapes (gloo, bf16 autocast), so the script
is tested where there is no GPU (tests/bench/test_gpu_check.py).

The training recipe differs from the preset in what a check can afford: 30 steps (checkpoint every
10), ``grad_accum=1`` (the preset's 8 would make each run 8x longer; peak memory and tokens/s are
per micro-batch), a few hundred training examples; batch 8 and ``data.max_length=1024`` as in the
preset, with Alpaca outputs long enough to fill it, so the peak is comparable with the headers'
"8 x 1024 tokens" estimates. ``--tiny`` accumulates over 2 micro-batches, so resume across an
accumulation window is covered there.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from moe_lora import outputs
from moe_lora.adapters.experts import AdaptedExperts
from moe_lora.bench import measure
from moe_lora.bench.run import main as bench_main
from moe_lora.checks import fsdp_check, train_check
from moe_lora.checks.check_report import compare_estimates, markdown, summary
from moe_lora.checks.fixtures import save_llama_checkpoint, write_sources
from moe_lora.checks.train_check import CheckFailure, TrainPlan, perf_summary, train_in_process
from moe_lora.errors import ConfigError, one_line
from moe_lora.tracking import write_json_atomic

VARIANTS = "peft_lora,lora,loramoe,mola,mola_grouped,hydralora,adamoe"
TINY_SHAPE = ["--hidden", "64", "--layers", "2", "--heads", "4", "--ffn", "128", "--vocab", "256"]


@dataclass(frozen=True)
class Mode:
    """What a check runs: shapes, sizes and step counts (GPU or ``--tiny``)."""

    name: str
    device: str
    bench: dict[str, list[str]]  # label -> `moe-lora bench` arguments (without --out)
    sweep: list[str]
    model_shape: dict[str, Any]  # changes to conf/model/llama2_7b.yaml for the checkpoint
    long_words: int  # filler words per Alpaca output (fills data.max_length)
    train: dict[str, Any]  # TrainPlan fields besides the paths
    fsdp_one_rank: dict[str, int]  # batch, seq, steps
    threads: int | None = None
    notes: list[str] = field(default_factory=list)
    moe: dict[str, Any] = field(default_factory=dict)  # moe_experts: "shape" (ModelConfig changes), run overrides


def gpu_mode(threads: int | None) -> Mode:
    common = ["--dtype", "bfloat16", "--seq", "512", "--batch", "8", "--device", "cuda", "--large", "none"]
    variants = ["--variants", VARIANTS]
    sweep = ["--experts", "4,8,16,32,64", "--variants", "mola,mola_grouped,loramoe,adamoe"]
    ranks = 2 if torch.cuda.device_count() >= 2 else 1
    train = dict(steps=30, save_every=10, batch_size=8, grad_accum=1, num_train=320, device="cuda")
    return Mode(
        name="gpu",
        device="cuda",
        bench={
            "0.5b": ["--size", "0.5b", *common, "--rounds", "10", *variants],
            "7b": ["--size", "7b", *common, "--rounds", "8", *variants],
        },
        sweep=["--size", "0.5b", *common, "--rounds", "6", *sweep],
        model_shape={},
        long_words=400,  # ~1,150 tokens with the fixture tokenizer: cut to data.max_length=1024
        train=train | dict(fsdp_steps=10, fsdp_ranks=ranks, hold=False, kill_timeout_s=600.0),
        fsdp_one_rank=dict(batch=4, seq=512, steps=4),
        threads=threads,
        notes=[] if ranks > 1 else ["one GPU: fsdp_runner trains unsharded (one rank); fsdp_one_rank shards"],
        moe=dict(
            shape=dict(hidden_size=1024, num_layers=4, intermediate_size=2048, num_heads=16, num_kv_heads=8),
            steps=20,
            batch_size=8,
            num_train=320,
            max_length=512,
        ),
    )


def tiny_mode(threads: int | None) -> Mode:
    common = ["--dtype", "bfloat16", "--seq", "32", "--batch", "2", "--device", "cpu", "--large", "none"]
    small = ["--size", "0.5b", *TINY_SHAPE, "--kv-heads", "2", *common]  # GQA like Qwen2.5-0.5B
    shape = dict(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, num_kv_heads=4, vocab_size=512)
    train = dict(steps=12, save_every=4, batch_size=4, grad_accum=2, num_train=96, device="cpu")
    return Mode(
        name="tiny",
        device="cpu",
        bench={
            "0.5b": [*small, "--rounds", "3", "--variants", VARIANTS],
            "7b": ["--size", "7b", *TINY_SHAPE, *common, "--rounds", "3", "--variants", VARIANTS],
        },
        sweep=[*small, "--rounds", "2", "--experts", "2,4", "--variants", "mola,mola_grouped"],
        model_shape=shape,
        long_words=0,
        train=train | dict(fsdp_steps=4, fsdp_ranks=2, hold=True, kill_timeout_s=120.0),
        fsdp_one_rank=dict(batch=2, seq=32, steps=3),
        threads=threads or 1,
        notes=["tiny shapes on the CPU: the figures check the script, not the hardware"],
        moe=dict(shape=shape, steps=4, batch_size=4, num_train=48, max_length=128),
    )


# ------------------------------------------------------------------------------------ the stages
class Check:
    """The run of one check: its folder, its mode, and every stage's record."""

    def __init__(self, out: Path, mode: Mode, keep_model: bool = False) -> None:
        self.out, self.mode, self.keep_model = out, mode, keep_model
        self.work = out / "work"
        self.stages: dict[str, dict[str, Any]] = {}
        self.start = time.perf_counter()

    def stage(self, name: str, fn: Callable[[], dict[str, Any]], needs: tuple[str, ...] = ()) -> None:
        """Run ``fn`` as stage ``name`` unless a stage it needs failed; record what happened."""
        print(f"[gpu-check] {name}: start", flush=True)
        t0 = time.perf_counter()
        failed = [n for n in needs if not self.stages.get(n, {}).get("ok")]
        if failed:
            rec: dict[str, Any] = {"ok": False, "reason": f"skipped: needs {', '.join(failed)}"}
        else:
            try:
                rec = {"ok": True, **fn()}
            except Exception as exc:  # a stage's failure is data; the next stages still run
                rec = {"ok": False, "reason": one_line(exc), "traceback": traceback.format_exc()}
        rec["seconds"] = time.perf_counter() - t0
        self.stages[name] = rec
        result = "ok" if rec["ok"] else f"FAILED: {rec['reason']}"
        print(f"[gpu-check] {name}: {result} ({rec['seconds']:.1f} s)", flush=True)
        free_memory()

    def plan(self) -> TrainPlan:
        return TrainPlan(
            model_dir=self.work / "model",
            data_root=self.work / "data",
            cache_dir=self.work / "cache",
            extra=tuple(train_extra(self.mode)),
            threads=self.mode.threads,
            **self.mode.train,
        )


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_extra(mode: Mode) -> list[str]:
    """Overrides that differ by mode: short sequences and small evaluations on the CPU."""
    if mode.name == "tiny":
        return ["data.max_length=128", "recipe.eval_limit=8", "eval.max_new_tokens=8"]
    return ["eval.max_new_tokens=16"]


def bench_stage(check: Check, label: str, args: list[str]) -> dict[str, Any]:
    path = check.out / f"bench_{label}.json"
    threads = ["--threads", str(check.mode.threads)] if check.mode.threads else []
    if bench_main([*args, *threads, "--out", str(path)]) != 0:
        raise CheckFailure("moe-lora bench exited non-zero")
    res = json.loads(path.read_text())
    s = res["settings"]
    tokens = s["batch"] * s["seq"]
    shown, flags = res.get("ratios_shown", True), res.get("unreliable", {})
    per_variant = {
        v: {
            "step_ms": ms,
            "tokens_per_s": tokens / (ms / 1000),
            "memory_mb": res["memory_mb"][v],
            "x_peft_lora": ms / res["median_step_ms"]["peft_lora"] if shown else None,  # too few rounds
            "unreliable": flags.get(v),
        }
        for v, ms in res["median_step_ms"].items()
    }
    return {
        "json": str(path),
        "variants": per_variant,
        "grouped_over_dense": res.get("grouped_over_dense", {}),
        "ratios_shown": shown,
        "warnings": measure.ratio_warnings(res),
    }


def sweep_stage(check: Check) -> dict[str, Any]:
    path = check.out / "sweep_0.5b.json"
    threads = ["--threads", str(check.mode.threads)] if check.mode.threads else []
    if bench_main([*check.mode.sweep, *threads, "--out", str(path)]) != 0:
        raise CheckFailure("moe-lora bench (expert sweep) exited non-zero")
    res = json.loads(path.read_text())
    png = Path(res["plot"])
    if not png.read_bytes().startswith(b"\x89PNG"):
        raise CheckFailure(f"{png} is not a PNG")
    return {"json": str(path), "plot": str(png), "table": res["table"], "grouped_over_dense": res["grouped_over_dense"]}


def checkpoint_stage(check: Check) -> dict[str, Any]:
    plan = check.plan()
    dtype = torch.bfloat16
    save_llama_checkpoint(plan.model_dir, "llama2_7b", dtype, check.mode.device, **check.mode.model_shape)
    write_sources(plan.data_root, long_words=check.mode.long_words)
    size = sum(p.stat().st_size for p in plan.model_dir.glob("*.safetensors"))
    config = json.loads((plan.model_dir / "config.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
    return {"model_dir": str(plan.model_dir), "weights_bytes": size, "config": {k: config[k] for k in keys}}


def train_stages(check: Check) -> None:
    plan, runs = check.plan(), check.work / "runs"
    ref, kill = runs / "reference", runs / "killed"
    runs.mkdir(parents=True, exist_ok=True)
    check.stage("train_reference", lambda: train_check.reference(plan, ref), needs=("checkpoint",))
    check.stage("train_killed", lambda: train_check.killed(plan, kill, runs / "killed.log"), needs=("checkpoint",))
    check.stage("train_resume", lambda: resume_stage(plan, kill, ref), needs=("train_reference", "train_killed"))
    check.stage("fsdp_runner", lambda: train_check.fsdp(plan, runs / "fsdp"), needs=("checkpoint",))
    one = check.mode.fsdp_one_rank
    data = [f"data.root={plan.data_root}", f"cache_dir={plan.cache_dir}"]
    check.stage(
        "fsdp_one_rank",
        lambda: fsdp_check.fsdp_one_rank(plan.model_dir, check.mode.device, overrides=data, **one),
        needs=("checkpoint",),
    )


def resume_stage(plan: TrainPlan, kill: Path, ref: Path) -> dict[str, Any]:
    perf = train_check.resumed(plan, kill)
    cmp = train_check.compare(kill, ref)
    if not cmp["within_tolerance"]:
        raise CheckFailure(
            f"resumed run differs from the uninterrupted one: loss rel {cmp['max_loss_rel_diff']:.2e}, "
            f"metrics rel {cmp['max_metric_rel_diff']:.2e} (> {cmp['rtol']})"
        )
    return {**perf, "comparison": cmp}


def memory_stage(check: Check) -> dict[str, Any]:
    peak = check.stages["train_reference"]["peak_mem_bytes"]
    out = compare_estimates(peak, applies=check.mode.name == "gpu")
    above = [r["preset"] for r in out["presets"] if r["verdict"] == "above"]
    if above:
        raise CheckFailure(f"training peak {peak / 2**30:.1f} GiB is above the estimate of {', '.join(above)}")
    return out


@contextmanager
def kernels_seen(seen: Counter) -> Iterator[None]:
    """Count the kernel every expert forward picks (``AdaptedExperts.kernel_for``), unchanged."""
    original = AdaptedExperts.kernel_for

    def spy(self: AdaptedExperts, x: torch.Tensor) -> str:
        kernel = original(self, x)
        seen[kernel] += 1
        return kernel

    AdaptedExperts.kernel_for = spy
    try:
        yield
    finally:
        AdaptedExperts.kernel_for = original


def moe_stage(check: Check) -> dict[str, Any]:
    """LoRA on a Mixtral-shaped MoE's attention and routed experts, bf16 base, through the CLI."""
    plan, moe = check.plan(), check.mode.moe
    model_dir, run_dir = check.work / "moe_model", check.work / "runs" / "moe_experts"
    save_llama_checkpoint(model_dir, "mixtral_8x7b", torch.bfloat16, check.mode.device, **moe["shape"])
    threads = [f"recipe.threads={check.mode.threads}"] if check.mode.threads else []
    seen: Counter = Counter()
    with kernels_seen(seen):
        train_in_process(
            [
                "model.source=hub",
                f"model.name_or_path={model_dir}",
                "model.dtype=bfloat16",
                "adapter=lora",
                "adapter.target_modules=[attention,experts]",
                "data=cbqa_instruct_hub",
                f"data.root={plan.data_root}",
                f"data.num_train={moe['num_train']}",
                f"data.max_length={moe['max_length']}",
                f"recipe.max_steps={moe['steps']}",
                f"recipe.batch_size={moe['batch_size']}",
                "recipe.log_every=1",
                "recipe.eval_limit=8",
                "eval.max_new_tokens=8",
                f"recipe.device={check.mode.device}",
                *threads,
                f"cache_dir={plan.cache_dir}",
                f"hydra.run.dir={run_dir}",
            ]
        )
    expected = "grouped_mm" if check.mode.device.startswith("cuda") else "csr"
    if set(seen) != {expected}:
        raise CheckFailure(f"expert adapters ran through {dict(seen)}, not only {expected}")
    tensors = load_file(str(run_dir / outputs.ADAPTER))
    experts = {k: t for k, t in tensors.items() if ".experts." in k}
    layers = {k.split(".layers.")[1].split(".")[0] for k in experts}
    untrained = sorted(k for k, t in experts.items() if k.endswith("lora_B") and not t.count_nonzero())
    if len(layers) != moe["shape"]["num_layers"] or untrained or {t.dtype for t in experts.values()} != {torch.float32}:
        raise CheckFailure(f"expert adapters: layers {sorted(layers)}, still zero {untrained[:2]}")
    return {
        **perf_summary(run_dir),
        "kernel": expected,
        "expert_forwards": seen[expected],
        "expert_adapter_tensors": len(experts),
        "expert_adapter_parameters": sum(t.numel() for t in experts.values()),
    }


def run_check(check: Check) -> int:
    for label, args in check.mode.bench.items():
        check.stage(f"bench_{label}", lambda label=label, args=args: bench_stage(check, label, args))
    check.stage("sweep_0.5b", lambda: sweep_stage(check))
    check.stage("checkpoint", lambda: checkpoint_stage(check))
    train_stages(check)
    check.stage("memory_vs_presets", lambda: memory_stage(check), needs=("train_reference",))
    check.stage("moe_experts", lambda: moe_stage(check), needs=("checkpoint",))
    if not check.keep_model:  # a 7B checkpoint is 13.5 GB of random weights
        shutil.rmtree(check.work / "model", ignore_errors=True)
        shutil.rmtree(check.work / "moe_model", ignore_errors=True)
    return finish(check)


def finish(check: Check) -> int:
    res = summary(check.mode, check.stages, time.perf_counter() - check.start)
    write_json_atomic(check.out / "gpu_check.json", res)
    (check.out / "gpu_check.md").write_text(markdown(res))
    print(markdown(res))
    print(f"written: {check.out / 'gpu_check.json'}, {check.out / 'gpu_check.md'}")
    for line in res["failures"]:
        print(f"gpu-check FAILED {line}", flush=True)
    return 1 if res["failures"] else 0


# ------------------------------------------------------------------------------------------ CLI
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="every stage on the CPU with tiny shapes (minutes -> seconds)")
    p.add_argument("--out", type=Path, default=None, help="a new folder (default outputs/gpu_check/<time>)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (--tiny: 1 unless given)")
    p.add_argument("--keep-model", action="store_true", help="keep the random checkpoint (13.5 GB for 7B)")
    a = p.parse_args(argv)
    a.out = a.out or Path("outputs/gpu_check") / time.strftime("%Y-%m-%d_%H-%M-%S")
    return a


def main(argv: list[str]) -> int:
    a = parse(argv)
    if a.out.exists():
        raise ConfigError(f"--out {a.out} exists; the check never writes into an earlier one: choose a new folder")
    if not a.tiny and not torch.cuda.is_available():
        raise ConfigError("no CUDA device here: run on a GPU machine, or pass --tiny for the CPU version")
    mode = tiny_mode(a.threads) if a.tiny else gpu_mode(a.threads)
    if mode.threads:
        torch.set_num_threads(mode.threads)
    a.out.mkdir(parents=True)
    print(f"[gpu-check] {mode.name} mode, writing to {a.out}", flush=True)
    return run_check(Check(a.out, mode, a.keep_model))
