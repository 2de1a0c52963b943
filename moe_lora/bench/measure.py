"""What `moe-lora bench` measures, and how: each variant built on a shared frozen base, one training
step (forward, backward, AdamW), step times interleaved over rounds, memory and matmul FLOPs, and
the ratios against peft LoRA measured alongside. :mod:`moe_lora.bench.run` is the command line;
:mod:`moe_lora.bench.sweep` calls :func:`measure` once per expert count.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

import moe_lora.adapters  # noqa: F401  (registers the variants)
from moe_lora.adapters import ADAPTERS
from moe_lora.adapters.inject import inject_adapter
from moe_lora.adapters.layer import LoRAExperts
from moe_lora.bench.reference import LoopMoELoRA
from moe_lora.config import LayoutConfig
from moe_lora.env import cpu_name
from moe_lora.errors import ConfigError
from moe_lora.model.load import arch_config
from moe_lora.model.structure import read_structure
from moe_lora.model.targets import resolve_targets
from moe_lora.routing.recorder import RoutingRecorder
from moe_lora.train.schedule import can_fuse

REFERENCE = ["base", "peft_lora"]  # frozen base, peft's LoRA: what every ratio is taken against
MIN_ROUNDS = 5  # fewer rounds: no step-time ratio is printed without --force (then each is flagged)
# IQR / median of a variant's per-round step times above this: its ratios flagged. The IQR, not the
# range: one slow round in twenty leaves the median alone, and a range only grows with more rounds,
# so "rerun with more --rounds" could never clear a range-based flag.
MAX_SPREAD = 0.25


LOOPS = {"loop_loramoe": "loramoe", "loop_mola": "mola", "loop_hydralora": "hydralora", "loop_adamoe": "adamoe"}


@dataclass
class Case:
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    recorder: object | None
    telemetry: bool
    steps: int = 0
    autocast: torch.dtype | None = None  # 16-bit base: the forward runs under autocast, adapters stay fp32


def target_modules(spec: str) -> list[str]:
    """``--modules`` as ``adapter.target_modules``: a block (``all``, ``attention``, ``ffn``) or a list."""
    return spec.split(",")


def base_model(a: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    config = arch_config(a.model_cfg)
    config.max_position_embeddings = max(getattr(config, "max_position_embeddings", 0) or 0, a.seq, 256)
    with torch.device(a.device):  # random init where it runs: seconds, not minutes, for a 7B shape on a GPU
        model = AutoModelForCausalLM.from_config(config).to(dtype=getattr(torch, a.dtype))
    model.requires_grad_(False)
    return model


def shared_copy(base: nn.Module) -> nn.Module:
    """A new module tree over the same frozen weights and buffers (nothing in a variant writes
    them), so that every variant of a measurement holds one copy of the base between them."""
    return copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()]})


def peft_targets(model: nn.Module, a: argparse.Namespace) -> list[str]:
    """The full names of the linears ``--modules`` selects on this model: peft adapts exactly those."""
    return [site.name for site in resolve_targets(read_structure(model), model, target_modules(a.modules))]


def adapter_config(name: str, a: argparse.Namespace, grouped: bool = False):
    """The variant's defaults with the benchmark's E, r, targets, dropout 0 and, for a variant that
    routes top-k (its default ``top_k`` is set, or it computes through grouped GEMMs), ``--top-k``.
    AdaMoE's real experts follow ``--experts`` too (its null experts stay at their default), so
    that its line in a sweep moves with E like the others."""
    node = ConfigStore.instance().load(f"schema/adapter/{name}.yaml").node
    cfg = OmegaConf.to_object(OmegaConf.merge(node, {"name": name}))
    names = {f.name for f in fields(cfg)}
    over = {"target_modules": target_modules(a.modules), "dropout": 0.0, "rank": a.rank, "num_experts": a.experts}
    if getattr(a, "top_k", None) is not None and (getattr(cfg, "top_k", None) is not None or grouped):
        over["top_k"] = a.top_k
    if grouped:  # top-k through the grouped path (CSR on the CPU, grouped GEMMs on a GPU), not the masked gate
        over["expert_compute"] = "grouped"
    return replace(cfg, **{k: v for k, v in over.items() if k in names})


SUFFIXES = ("_compiled", "_grouped", "_no_telemetry")


def adapted_variants() -> list[str]:
    """Every registered variant that adapts modules (full fine-tuning and the frozen base replace
    none): the benchmark's default, so a new variant is measured without editing this file."""
    return [name for name in ADAPTERS if ADAPTERS.get(name).wrap is not None]


def split_variant(variant: str) -> tuple[str, set[str]]:
    """``'loramoe_no_telemetry_compiled'`` -> ``('loramoe', {'_no_telemetry', '_compiled'})``:
    ``_compiled`` compiles that model only, ``_grouped`` computes only the top-k pairs (CSR on the
    CPU, grouped GEMMs on a GPU), ``_no_telemetry`` switches routing statistics and auxiliary losses off."""
    flags: set[str] = set()
    while suffix := next((x for x in SUFFIXES if variant.endswith(x)), None):
        flags.add(suffix)
        variant = variant.removesuffix(suffix)
    return variant, flags


def build(variant: str, a: argparse.Namespace, base: nn.Module | None = None) -> Case:
    """One variant on ``base``'s weights (shared, see :func:`shared_copy`), or on a base of its own."""
    model = shared_copy(base) if base is not None else base_model(a)
    recorder = RoutingRecorder()
    variant, flags = split_variant(variant)
    telemetry = "_no_telemetry" not in flags
    if variant == "base":  # frozen: backward runs through the activations into the embeddings only
        recorder = None
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head is not None and head.weight is emb.weight
        # a copy of its own (still tied where the model ties it): the shared one stays frozen for the others
        emb.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=True)
        if tied:
            head.weight = emb.weight
    elif variant == "peft_lora":
        model = get_peft_model(
            model, LoraConfig(r=a.rank, lora_alpha=a.rank, lora_dropout=0.0, target_modules=peft_targets(model, a))
        )
        recorder = None
    else:
        cfg = adapter_config(LOOPS.get(variant, variant), a, grouped="_grouped" in flags)
        inject_adapter(model, cfg, a.model_cfg, LayoutConfig(), recorder)
        if variant in LOOPS:  # same routing, statistics and aux losses; experts looped as research code does
            for n, m in list(model.named_modules()):
                if isinstance(m, LoRAExperts):
                    parent, _, child = n.rpartition(".")
                    loop = LoopMoELoRA.from_ours(m)
                    recorder.attach(loop.router, m.router.module_name, m.router.aux)
                    setattr(model.get_submodule(parent), child, loop)
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW as fine-tuning makes it (fused where torch has the kernel), for every variant alike
    opt = torch.optim.AdamW(params, lr=1e-4, fused=can_fuse(params)) if params and variant != "base" else None
    if a.compile or "_compiled" in flags:
        model = torch.compile(model)
    half = a.dtype != "float32"  # as in training: peft and our adapters keep float32 weights under autocast
    return Case(model, opt, recorder, telemetry, autocast=getattr(torch, a.dtype) if half else None)


def make_batch(a: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(a.device)
    task = (torch.arange(a.batch) % 2).to(a.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "task_type": task}


def train_step(case: Case, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One forward, backward and AdamW step; the loss (detached, not read: no host sync)."""
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
    return loss.detach()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def resident_bytes(case: Case) -> int:
    """The case's own parameters and optimiser state: what stays allocated between its steps."""
    tensors = {p.data_ptr(): p.numel() * p.element_size() for p in case.model.parameters()}
    if case.optimizer is not None:
        for state in case.optimizer.state.values():
            tensors |= {t.data_ptr(): t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t)}
    return sum(tensors.values())


def memory_bytes(case: Case, batch: dict[str, torch.Tensor], device: str) -> int:
    """GPU: the step's peak allocation above what was allocated before it, plus the case's own
    parameters and optimiser state; the other variants' models, resident beside it in this process,
    do not count. CPU: saved-for-backward + parameters + gradients + AdamW state."""
    if device.startswith("cuda"):
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(case, batch)
        sync(device)
        return torch.cuda.max_memory_allocated() - before + resident_bytes(case)
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


def nonzeros(t: torch.Tensor) -> int:
    """Rows x columns of a dense matrix; the stored entries of a sparse one."""
    return t._nnz() if t.layout == torch.sparse_csr else t.shape[0] * t.shape[1]


def flop_count(case: Case, batch: dict[str, torch.Tensor]) -> int:
    """Matmul FLOPs of one training step (forward and backward), torch's FLOP counter plus the
    in-place ``addmm_``, the grouped GEMM and the CSR kernels it does not know: the arithmetic a
    variant asks for."""

    def addmm_flop(out, a, b, *args, out_val=None, **kwargs) -> int:  # out (M,N) += a (M,K) @ b (K,N), a dense or CSR
        return 2 * nonzeros(a) * b.shape[1]

    def sampled_flop(pattern, a, b, *args, out_val=None, **kwargs) -> int:  # (a @ b) at the pattern's entries
        return 2 * nonzeros(pattern) * a.shape[1]

    for f in (addmm_flop, sampled_flop):
        f._get_raw = True  # the tensors, not their shapes: a sparse matrix's work is its nonzeros

    def grouped_flop(a, b, *args, out_shape=None, **kwargs) -> int:  # (M,K)x(E,K,N) or (K,M)x(M,N)->(E,K,N)
        return 2 * out_shape[-2] * out_shape[-1] * a[-1]

    aten = torch.ops.aten
    mapping = {
        aten.addmm_: addmm_flop,
        aten._sparse_addmm: addmm_flop,  # torch.sparse.mm's product
        aten.sparse_sampled_addmm: sampled_flop,
        **({aten._grouped_mm: grouped_flop} if hasattr(aten, "_grouped_mm") else {}),
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        train_step(case, batch)
    return counter.get_total_flops()


def measure(variants: list[str], a: argparse.Namespace, progress: Callable[[str], None] = print) -> dict:
    batch = make_batch(a)
    base = base_model(a)
    cases = {v: build(v, a, base) for v in variants}
    del base  # the cases hold its weights
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
        "round_s": times,
        "memory_bytes": memory,
        "flops": flops,
        "spread": {v: time_spread(t) for v, t in times.items()},
    }


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median: the order statistics k and n + 1 - k, k the
    largest with P(Binomial(n, 1/2) < k) <= (1 - level) / 2; below 6 values, the whole range (which
    then covers less than ``level``)."""
    ordered, n = sorted(values), len(values)
    k, tail = 0, 0.0
    while k < n // 2 and tail + math.comb(n, k) / 2**n <= (1 - level) / 2:
        tail += math.comb(n, k) / 2**n
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def time_range(times: list[float]) -> float:
    """(max - min) / median of a variant's per-round step times: how far apart its rounds were."""
    return (max(times) - min(times)) / statistics.median(times)


def ratio_interval(num: list[float], den: list[float]) -> tuple[float, float]:
    """95% interval of the median per-round ratio: rounds are interleaved, so round i of both
    variants met the same machine state (pairs)."""
    return median_interval([a / b for a, b in zip(num, den, strict=True)])


def time_spread(times: list[float]) -> float:
    """IQR / median of a variant's per-round step times: the spread the JSON reports and the flag judges."""
    return iqr(times) / statistics.median(times)


def unreliable(rounds: dict[str, list[float]], num: str, den: str) -> str | None:
    """Why the step-time ratio ``num / den`` cannot be trusted (None when it can): the middle half of
    either side's rounds spread wide, or a 95% interval that holds 1 (no difference measured). Too
    few rounds is said once, for every ratio (``ratios_shown``)."""
    wide = {v: time_spread(rounds[v]) for v in dict.fromkeys((num, den))}
    reasons = [f"{v} {s:.0%}" for v, s in wide.items() if s > MAX_SPREAD]
    reasons = [f"IQR/median of the rounds {', '.join(reasons)} (> {MAX_SPREAD:.0%})"] if reasons else []
    lo, hi = ratio_interval(rounds[num], rounds[den])
    if len(rounds[num]) >= 2 and lo <= 1 <= hi:
        reasons.append(f"interval [{lo:.2f}, {hi:.2f}] holds 1")
    return "; ".join(reasons) or None


def iqr(values: list[float]) -> float:
    """Interquartile range: how much a variant's step time moved over the rounds."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def settings(a: argparse.Namespace) -> dict:
    """The flags as run (the shape filled in), the thread count and the machine: beside every result."""
    return {
        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items() if k != "model_cfg"},
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": cpu_name(),
    }


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("transformers", "peft"):
        out[mod] = __import__(mod).__version__
    return out


def report(raw: dict, a: argparse.Namespace) -> dict:
    """Medians, ratios against peft LoRA and the figures to judge them by: the per-round times,
    each ratio's interval, and the step-time ratios that are unreliable (``unreliable``: label ->
    why); with fewer than :data:`MIN_ROUNDS` rounds ``ratios_shown`` is false unless ``--force``."""
    t, mem = raw["median_s"], raw["memory_bytes"]
    ref_t, ref_m = t["peft_lora"], mem["peft_lora"]

    def is_ours(variant: str) -> bool:  # our layers as users run them: not peft, not the loop, telemetry on
        name, flags = split_variant(variant)
        return name not in (*LOOPS, "peft_lora") and "_no_telemetry" not in flags

    ours = [v for v in t if is_ours(v)]
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
        "settings": settings(a),
        "versions": versions(),
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
    out.update(judged(raw["round_s"], ours, a))
    return out


def judged(rounds: dict[str, list[float]], ours: list[str], a: argparse.Namespace) -> dict:
    """The per-round times and what they say about the step-time ratios (see :func:`report`)."""
    pairs = {v: (v, "peft_lora") for v in rounds if v != "peft_lora"}  # label -> (numerator, denominator)
    pairs |= {f"loop {d}": (v, d) for v, d in LOOPS.items() if v in rounds and d in rounds}
    pairs |= {f"grouped {split_variant(v)[0]}": (v, split_variant(v)[0]) for v in rounds if v.endswith("_grouped")}
    pairs |= {"telemetry": ("loramoe", "loramoe_no_telemetry")} if "loramoe_no_telemetry" in rounds else {}
    pairs = {k: p for k, p in pairs.items() if p[1] in rounds}
    flags = {k: why for k, (num, den) in pairs.items() if (why := unreliable(rounds, num, den))}
    return {
        "rounds": len(rounds["peft_lora"]),
        "min_rounds": MIN_ROUNDS,  # below it the ratios were withheld, or (--force) shown and all flagged
        "ratios_shown": len(rounds["peft_lora"]) >= MIN_ROUNDS or bool(getattr(a, "force", False)),
        "step_ms_per_round": {v: [1000 * x for x in ts] for v, ts in rounds.items()},
        "step_time_range_over_median": {v: time_range(ts) for v, ts in rounds.items()},
        "ratio_interval_vs_peft_lora": {v: list(ratio_interval(rounds[v], rounds["peft_lora"])) for v in ours},
        "unreliable": flags,
    }


def ratio_warnings(res: dict) -> list[str]:
    """Lines under the table saying which step-time ratios were left out or flagged, and why."""
    if "unreliable" not in res:  # a result written before these checks
        return []
    if not res["ratios_shown"]:
        return [
            f"warning: step-time ratios not printed: {res['rounds']} rounds < {MIN_ROUNDS}, too few to judge their "
            f"spread; rerun with --rounds {MIN_ROUNDS} or more (--force prints them flagged)"
        ]
    few = res["rounds"] < MIN_ROUNDS
    if not res["unreliable"] and not few:
        return []
    head = f"only {res['rounds']} rounds (< {MIN_ROUNDS}, --force): every one, and " if few else ""
    lines = [f"warning: step-time ratios marked * are unreliable: {head}those below (rerun with more --rounds):"]
    return lines + [f"  {label}: {why}" for label, why in res["unreliable"].items()]


def refuse_existing(path: Path | None, flag: str, overwrite: bool) -> None:
    """An earlier result is never replaced silently: checked before anything is measured."""
    if path is not None and path.exists() and not overwrite:
        raise ConfigError(f"{flag} {path} exists; pass --overwrite to replace it, or choose a new file")


def chosen_variants(a: argparse.Namespace, default: list[str]) -> list[str]:
    """``--variants`` (or ``default``), with peft LoRA first where it is missing: every ratio needs it."""
    variants = [v for v in a.variants.split(",") if v] or default
    return variants if "peft_lora" in variants else ["peft_lora", *variants]


def grouped_variants() -> list[str]:
    return ["mola_grouped"] if hasattr(torch, "_grouped_mm") else []  # torch >= 2.8
