"""`moe-lora bench`: training-step time and memory of every variant against peft's LoRA.

All variants live in one process and are interleaved over the rounds, so that drift of the
machine (other load, frequency) hits them alike; the figure is the median step (forward, backward,
AdamW step). Memory on CPU is the bytes saved for backward (saved-tensor hooks) plus parameters,
gradients and optimiser state; on a GPU it is the peak allocated memory of a step. Ratios are
against peft LoRA measured in the same run; nothing is compared with numbers from elsewhere.

Shapes come from ``conf/model/`` (``--model NAME``: its family, layers, widths, heads, kv heads and
vocabulary), with random weights; ``--hidden`` etc. override single fields. ``--size`` names three:
``tiny`` (default; the built-in world model's Llama widened to hidden 256, FFN 688, vocab 2000),
``0.5b`` (``qwen2_5_0_5b``) and ``7b`` (``llama2_7b``; about 14 GB in bf16). ``--modules`` takes what
``adapter.target_modules`` takes (``all``, ``attention``, ``ffn``, roles or names), resolved on the
model by ``structure.py``; peft's LoRA gets the same linears by name. On a GPU the default run also
measures the ``0.5b`` shape in bfloat16 at sequence 512 for the core variants (``--large none``
skips it, ``--large 7b`` or a model name picks another); its results are under ``"large"`` in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from torch import nn

from moe_lora.errors import ConfigError

REFERENCE = ["base", "peft_lora"]  # frozen base, peft's LoRA: what every ratio is taken against
LOOPS = {"loop_loramoe": "loramoe", "loop_mola": "mola", "loop_hydralora": "hydralora", "loop_adamoe": "adamoe"}


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


@dataclass
class Case:
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    recorder: object | None
    telemetry: bool
    steps: int = 0
    autocast: torch.dtype | None = None  # 16-bit base: the forward runs under autocast, adapters stay fp32


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
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument(
        "--modules",
        default="all",
        help="adapter.target_modules: 'all', 'ffn', 'attention' or comma-separated roles / module names",
    )
    p.add_argument("--variants", default="", help="comma-separated subset (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile every model (whole model)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here (a new file)")
    p.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    p.add_argument(
        "--large",
        default=None,
        help="also measure this size or conf/model config in bfloat16 at sequence 512 (default: 0.5b on "
        "a GPU, none on CPU)",
    )
    a = p.parse_args(argv)
    a.model, a.model_cfg = with_shape(a, *SIZES[a.size]) if a.model is None else with_shape(a, a.model, {})
    if a.large is None:
        a.large = "0.5b" if a.device.startswith("cuda") else "none"
    return a


def model_shape(name: str):
    """The ModelConfig of ``conf/model/<name>.yaml`` (its architecture fields: no download)."""
    from moe_lora.compose import load_config

    return load_config([f"model={name}"], check_files=False).model


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


def target_modules(spec: str) -> list[str]:
    """``--modules`` as ``adapter.target_modules``: a block (``all``, ``attention``, ``ffn``) or a list."""
    return spec.split(",")


def base_model(a: argparse.Namespace) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from moe_lora.models import arch_config

    torch.manual_seed(0)
    config = arch_config(a.model_cfg)
    config.max_position_embeddings = max(getattr(config, "max_position_embeddings", 0) or 0, a.seq, 256)
    with torch.device(a.device):  # random init where it runs: seconds, not minutes, for a 7B shape on a GPU
        model = AutoModelForCausalLM.from_config(config).to(dtype=getattr(torch, a.dtype))
    model.requires_grad_(False)
    return model


def peft_targets(model: nn.Module, a: argparse.Namespace) -> list[str]:
    """The full names of the linears ``--modules`` selects on this model: peft adapts exactly those."""
    from moe_lora.structure import read_structure
    from moe_lora.targets import resolve_targets

    return [site.name for site in resolve_targets(read_structure(model), model, target_modules(a.modules))]


def adapter_config(name: str, a: argparse.Namespace):
    """The variant's defaults with the benchmark's E, r, targets and dropout 0."""
    node = ConfigStore.instance().load(f"schema/adapter/{name}.yaml").node
    cfg = OmegaConf.to_object(OmegaConf.merge(node, {"name": name}))
    names = {f.name for f in fields(cfg)}
    over = {"target_modules": target_modules(a.modules), "dropout": 0.0, "rank": a.rank}
    if name != "adamoe":
        over["num_experts"] = a.experts
    return replace(cfg, **{k: v for k, v in over.items() if k in names})


SUFFIXES = ("_compiled", "_grouped", "_no_telemetry")


def adapted_variants() -> list[str]:
    """Every registered variant that adapts modules (full fine-tuning and the frozen base replace
    none): the benchmark's default, so a new variant is measured without editing this file."""
    from moe_lora.adapters import ADAPTERS

    return [name for name in ADAPTERS if ADAPTERS.get(name).wrap is not None]


def split_variant(variant: str) -> tuple[str, set[str]]:
    """``'loramoe_no_telemetry_compiled'`` -> ``('loramoe', {'_no_telemetry', '_compiled'})``:
    ``_compiled`` compiles that model only, ``_grouped`` computes top-k with grouped GEMMs,
    ``_no_telemetry`` switches routing statistics and auxiliary losses off."""
    flags: set[str] = set()
    while suffix := next((x for x in SUFFIXES if variant.endswith(x)), None):
        flags.add(suffix)
        variant = variant.removesuffix(suffix)
    return variant, flags


def build(variant: str, a: argparse.Namespace) -> Case:
    import moe_lora.adapters  # noqa: F401  (registers the variants)
    from moe_lora.adapters.inject import inject_adapter
    from moe_lora.adapters.layer import LoRAExperts
    from moe_lora.bench.reference import LoopMoELoRA
    from moe_lora.config import LayoutConfig
    from moe_lora.routing.recorder import RoutingRecorder

    model = base_model(a)
    recorder = RoutingRecorder()
    variant, flags = split_variant(variant)
    telemetry = "_no_telemetry" not in flags
    if variant == "base":  # frozen: backward runs through the activations into the embeddings only
        recorder = None
        model.get_input_embeddings().weight.requires_grad_(True)
    elif variant == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=a.rank, lora_alpha=a.rank, lora_dropout=0.0, target_modules=peft_targets(model, a))
        )
        recorder = None
    else:
        cfg = adapter_config(LOOPS.get(variant, variant), a)
        if "_grouped" in flags:  # top-k through grouped GEMMs instead of the dense masked gate
            cfg = replace(cfg, expert_compute="grouped")
        inject_adapter(model, cfg, a.model_cfg, LayoutConfig(), recorder)
        if variant in LOOPS:  # same routing, statistics and aux losses; experts looped as research code does
            for n, m in list(model.named_modules()):
                if isinstance(m, LoRAExperts):
                    parent, _, child = n.rpartition(".")
                    loop = LoopMoELoRA.from_ours(m)
                    recorder.attach(loop.router, m.router.module_name, m.router.aux)
                    setattr(model.get_submodule(parent), child, loop)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params and variant != "base" else None
    if a.compile or "_compiled" in flags:
        model = torch.compile(model)
    half = a.dtype != "float32"  # as in training: peft and our adapters keep float32 weights under autocast
    return Case(model, opt, recorder, telemetry, autocast=getattr(torch, a.dtype) if half else None)


def make_batch(a: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(a.device)
    task = (torch.arange(a.batch) % 2).to(a.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "task_type": task}


def train_step(case: Case, batch: dict[str, torch.Tensor]) -> None:
    rec = case.recorder
    ctx = rec.batch(batch["attention_mask"], batch["task_type"]) if rec and case.telemetry else contextlib.nullcontext()
    device = batch["input_ids"].device.type
    with ctx, torch.autocast(device, dtype=case.autocast or torch.bfloat16, enabled=case.autocast is not None):
        loss = case.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    aux = rec.pop_aux_loss() if rec else None
    if aux is not None:
        loss = loss + aux
    loss.backward()
    if case.optimizer is not None:
        case.optimizer.step()
        case.optimizer.zero_grad(set_to_none=True)
    else:
        case.model.get_input_embeddings().weight.grad = None
    case.steps += 1
    if rec is not None and case.telemetry and case.steps % 10 == 0:
        rec.flush(case.steps)  # statistics are read at logging steps: every 10th step here


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory_bytes(case: Case, batch: dict[str, torch.Tensor], device: str) -> int:
    """Peak allocated (GPU), or saved-for-backward + parameters + gradients + AdamW state (CPU)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        train_step(case, batch)
        sync(device)
        return torch.cuda.max_memory_allocated()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(case, batch)
    params = list(case.model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return sum(seen.values()) + weights + (trainable * 3 if case.optimizer else 0)  # grads + two AdamW moments


def flop_count(case: Case, batch: dict[str, torch.Tensor]) -> int:
    """Matmul FLOPs of one training step (forward and backward), torch's FLOP counter plus the
    in-place ``addmm_`` and the grouped GEMM it does not know: the arithmetic a variant asks for."""
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_flop(out, a, b, *args, out_shape=None, **kwargs) -> int:  # out (M,N) += a (M,K) @ b (K,N)
        return 2 * a[0] * a[1] * b[1]

    def grouped_flop(a, b, *args, out_shape=None, **kwargs) -> int:  # (M,K)x(E,K,N) or (K,M)x(M,N)->(E,K,N)
        return 2 * out_shape[-2] * out_shape[-1] * a[-1]

    aten = torch.ops.aten
    mapping = {aten.addmm_: addmm_flop, **({aten._grouped_mm: grouped_flop} if hasattr(aten, "_grouped_mm") else {})}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        train_step(case, batch)
    return counter.get_total_flops()


def measure(variants: list[str], a: argparse.Namespace, progress: Callable[[str], None] = print) -> dict:
    batch = make_batch(a)
    cases = {v: build(v, a) for v in variants}
    for v, case in cases.items():  # warm-up (and compile)
        for _ in range(2):
            train_step(case, batch)
        progress(f"built {v}")
    times: dict[str, list[float]] = {v: [] for v in variants}
    names = list(cases)
    for i in range(a.rounds):  # the order rotates each round, so no variant always runs first or last
        for v in names[i % len(names) :] + names[: i % len(names)]:
            case = cases[v]
            sync(a.device)
            t0 = time.perf_counter()
            train_step(case, batch)
            sync(a.device)
            times[v].append(time.perf_counter() - t0)
    memory = {v: memory_bytes(case, batch, a.device) for v, case in cases.items()}
    flops = {v: flop_count(case, batch) for v, case in cases.items() if "_compiled" not in split_variant(v)[1]}
    return {
        "median_s": {v: statistics.median(t) for v, t in times.items()},
        "memory_bytes": memory,
        "flops": flops,
        "spread": {v: iqr(t) / statistics.median(t) for v, t in times.items()},
    }


def iqr(values: list[float]) -> float:
    """Interquartile range: how much a variant's step time moved over the rounds."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def report(raw: dict, a: argparse.Namespace) -> dict:
    t, mem = raw["median_s"], raw["memory_bytes"]
    ref_t, ref_m = t["peft_lora"], mem["peft_lora"]

    def is_ours(variant: str) -> bool:  # our layers as users run them: not peft, not the loop, telemetry on
        name, flags = split_variant(variant)
        return name not in (*LOOPS, "peft_lora") and "_no_telemetry" not in flags

    ours = [v for v in t if is_ours(v)]
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("transformers", "peft"):
        versions[mod] = __import__(mod).__version__
    out = {
        "ratio_vs_peft_lora": {v: t[v] / ref_t for v in ours},
        "memory_ratio_vs_peft_lora": {v: mem[v] / ref_m for v in ours},
        # matmul FLOPs of a step against peft LoRA's: what the arithmetic alone would cost
        "flop_ratio_vs_peft_lora": {v: f / raw["flops"]["peft_lora"] for v, f in raw["flops"].items() if v in ours},
        "gflops_per_step": {v: f / 1e9 for v, f in raw["flops"].items()},
        "loop_reference_over_ours": {LOOPS[v]: t[v] / t[LOOPS[v]] for v in LOOPS if v in t and LOOPS[v] in t},
        "median_step_ms": {v: 1000 * s for v, s in t.items()},
        "step_time_iqr_over_median": raw["spread"],  # the noise to read the ratios against
        "memory_mb": {v: b / 2**20 for v, b in mem.items()},
        "settings": {
            **{k: v for k, v in vars(a).items() if k != "model_cfg"},
            "out": str(a.out) if a.out else None,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "versions": versions,
    }
    compiled = {v: t[v] / ref_t for v in t if v.endswith("_compiled")}
    if compiled:  # the target: compiled MoE against *eager* peft LoRA
        out["compiled_vs_eager_peft_lora"] = compiled
    grouped = {
        split_variant(v)[0]: t[v] / t[split_variant(v)[0]]
        for v in t
        if split_variant(v)[1] == {"_grouped"} and split_variant(v)[0] in t
    }
    if grouped:
        out["grouped_over_dense"] = grouped
    if "loramoe_no_telemetry" in t and "loramoe" in t:
        out["telemetry_overhead"] = t["loramoe"] / t["loramoe_no_telemetry"]
    return out


def table(res: dict) -> str:
    ms, mb = res["median_step_ms"], res["memory_mb"]
    gf = res["gflops_per_step"]
    rows = [f"{'variant':<30} {'step ms':>8} {'x peft':>7} {'memory MB':>10} {'x peft':>7} {'GFLOP':>7} {'x peft':>7}"]
    for v in ms:
        ratio = res["ratio_vs_peft_lora"].get(v, ms[v] / ms["peft_lora"])
        mratio = res["memory_ratio_vs_peft_lora"].get(v, mb[v] / mb["peft_lora"])
        flops = f"{gf[v]:>7.1f} {gf[v] / gf['peft_lora']:>7.2f}" if v in gf else f"{'-':>7} {'-':>7}"
        rows.append(f"{v:<30} {ms[v]:>8.1f} {ratio:>7.2f} {mb[v]:>10.1f} {mratio:>7.2f} {flops}")
    rows.append("")
    spread = res["step_time_iqr_over_median"]
    rows.append(
        f"step-time spread over rounds (IQR / median): {min(spread.values()):.1%} to {max(spread.values()):.1%}"
    )
    rows += [f"loop reference / ours ({k}): {r:.2f}x" for k, r in res["loop_reference_over_ours"].items()]
    rows += [
        f"compiled {k.removesuffix('_compiled')} / eager peft LoRA: {r:.2f}x"
        for k, r in res.get("compiled_vs_eager_peft_lora", {}).items()
    ]
    rows += [
        f"top-k through grouped GEMMs / dense masked gate ({k}): {r:.2f}x"
        for k, r in res.get("grouped_over_dense", {}).items()
    ]
    if "telemetry_overhead" in res:
        rows.append(f"routing statistics + aux losses on / off (loramoe): {res['telemetry_overhead']:.3f}x")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    a = parse(argv)
    if a.out and a.out.exists() and not a.overwrite:
        raise ConfigError(f"--out {a.out} exists; pass --overwrite to replace it, or choose a new file")
    if a.threads:
        torch.set_num_threads(a.threads)
    grouped = ["mola_grouped"] if hasattr(torch, "_grouped_mm") else []  # torch >= 2.8
    default = [*REFERENCE, *adapted_variants(), "loramoe_no_telemetry", *grouped, "loramoe_compiled", *LOOPS]
    variants = [v for v in a.variants.split(",") if v] or default
    for needed in ("peft_lora",):
        if needed not in variants:
            variants.insert(0, needed)
    res = report(measure(variants, a), a)
    print(table(res))
    if a.large != "none":
        big = large_args(a)
        print(
            f"\n{a.large}-shaped model ({big.model}), bfloat16, sequence {big.seq} (every variant holds its own copy):"
        )
        res["large"] = report(measure([v for v in LARGE_VARIANTS if v != "mola_grouped" or grouped], big), big)
        print(table(res["large"]))
    if a.out:
        from moe_lora.tracking import write_json_atomic

        write_json_atomic(a.out, res)
        print(f"written: {a.out}")
    return 0
