"""LoRA on the routed experts of an MoE base against peft's ``target_parameters``, at several expert
counts: one training step (forward, backward, AdamW) of a Mixtral-shaped model with the same targets
(every layer's ``experts.gate_up_proj`` and ``experts.down_proj``), the same rank per expert and
equal weights, timed over interleaved rounds (median), and the step's memory (:func:`step_bytes`).

peft adds ``B_e A_e`` to every expert's weight on every forward (an ``E x out x in`` tensor per
projection, kept for the backward); :class:`moe_lora.adapters.experts.LoRAOnExperts` computes the
adapters on the chosen (token, expert) pairs only. So peft's cost grows with E at a fixed top-k, ours
follows top-k. ``python -m moe_lora.bench.experts_vs_peft --experts 8,64`` prints the table, and so
does ``moe-lora bench --experts-vs-peft [COUNTS]`` (:func:`from_bench`: the bench's flags that apply
here, everything else at this module's defaults).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, MixtralConfig

from moe_lora.adapters.experts import LoRAOnExperts
from moe_lora.bench.measure import Case, sync, train_step
from moe_lora.errors import ConfigError

PROJECTIONS = ("gate_up_proj", "down_proj")
FLAG = "--experts-vs-peft"  # `moe-lora bench --experts-vs-peft [COUNTS]`
DEFAULT_COUNTS = "8,64"
# `moe-lora bench` flags that mean the same here (bench name -> this module's); the others would
# silently not apply, so they are refused
BENCH_FLAGS = {
    "--rounds": "--rounds",
    "--seq": "--seq",
    "--batch": "--batch",
    "--rank": "--rank",
    "--top-k": "--top-k",
    "--layers": "--layers",
    "--vocab": "--vocab",
    "--hidden": "--hidden",
    "--ffn": "--intermediate",
    "--device": "--device",
    "--threads": "--threads",
    "--out": "--json",
}


def moe_base(num_experts: int, a: argparse.Namespace) -> torch.nn.Module:
    """A frozen random Mixtral-shaped model (the experts' GEMMs dominate its step)."""
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=num_experts,
        num_experts_per_tok=a.top_k,
        max_position_embeddings=max(256, a.seq),
    )
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(config)
    return model.requires_grad_(False)


def with_peft(base: torch.nn.Module, a: argparse.Namespace) -> torch.nn.Module:
    config = LoraConfig(
        r=a.rank, lora_alpha=a.rank, target_modules=[], target_parameters=[f"experts.{p}" for p in PROJECTIONS]
    )
    return get_peft_model(copy.deepcopy(base), config)


def with_ours(base: torch.nn.Module, a: argparse.Namespace) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for layer in model.model.layers:
        layer.mlp.experts = LoRAOnExperts(layer.mlp.experts, PROJECTIONS, rank=a.rank, alpha=a.rank)
    return model


def case(model: torch.nn.Module, a: argparse.Namespace) -> Case:
    for p in model.parameters():  # B != 0, so both sides compute the whole update (peft's B starts at 0 too)
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Case(model, torch.optim.AdamW(trainable, lr=1e-4), None, False)


def step_bytes(c: Case, batch: dict[str, torch.Tensor], device: str) -> int:
    """GPU: the step's peak allocation above what was allocated before it. CPU: the tensors saved
    for the backward that are not the model's own weights (peft's ``W + dW`` is; the base weight a
    GEMM saves is not), plus the trainable parameters, their gradients and AdamW's two moments."""
    if device.startswith("cuda"):
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(c, batch)
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    own = {p.untyped_storage().data_ptr() for p in c.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(c, batch)
    trainable = sum(p.numel() * p.element_size() for p in c.model.parameters() if p.requires_grad)
    return sum(seen.values()) + 4 * trainable


def measure_count(num_experts: int, a: argparse.Namespace) -> dict:
    base = moe_base(num_experts, a)
    cases = {"ours": case(with_ours(base, a), a), "peft": case(with_peft(base, a), a)}
    del base
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(a.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for c in cases.values():  # warm-up
        for _ in range(2):
            train_step(c, batch)
    times: dict[str, list[float]] = {n: [] for n in cases}
    names = list(cases)
    for i in range(a.rounds):  # alternate who goes first
        for n in names[i % 2 :] + names[: i % 2]:
            sync(a.device)
            t0 = time.perf_counter()
            train_step(cases[n], batch)
            sync(a.device)
            times[n].append(time.perf_counter() - t0)
    trainable = {n: sum(p.numel() for p in c.model.parameters() if p.requires_grad) for n, c in cases.items()}
    assert trainable["ours"] == trainable["peft"], trainable  # same targets and rank: the same adapters
    memory = {n: step_bytes(c, batch, a.device) for n, c in cases.items()}
    median = {n: statistics.median(t) for n, t in times.items()}
    return {
        "experts": num_experts,
        "trainable": trainable["ours"],
        "median_s": median,
        "round_s": times,
        "memory_bytes": memory,
        "time_ratio": median["ours"] / median["peft"],
        "memory_ratio": memory["ours"] / memory["peft"],
    }


def table(rows: list[dict], a: argparse.Namespace) -> str:
    lines = [
        f"LoRA on experts vs peft target_parameters: Mixtral shape hidden {a.hidden}, intermediate "
        f"{a.intermediate}, {a.layers} layers, top-{a.top_k}, rank {a.rank} per expert, batch {a.batch}x{a.seq}, "
        f"{a.device}, {torch.get_num_threads()} threads, {a.rounds} rounds (median)",
        f"  {'experts':>7} {'trainable':>10} {'ours ms':>9} {'peft ms':>9} {'time':>6} {'ours MiB':>9} "
        f"{'peft MiB':>9} {'memory':>7}",
    ]
    for r in rows:
        t, m = r["median_s"], r["memory_bytes"]
        lines.append(
            f"  {r['experts']:>7} {r['trainable']:>10} {t['ours'] * 1e3:>9.1f} {t['peft'] * 1e3:>9.1f} "
            f"{r['time_ratio']:>5.2f}x {m['ours'] / 2**20:>9.1f} {m['peft'] / 2**20:>9.1f} {r['memory_ratio']:>6.2f}x"
        )
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moe_lora.bench.experts_vs_peft", description=__doc__.split("\n")[0])
    p.add_argument("--experts", default="8,64", help="expert counts, comma-separated")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the rows (per-round times included) here")
    return p.parse_args(argv)


def from_bench(argv: list[str]) -> int:
    """``moe-lora bench --experts-vs-peft [COUNTS] [flags]``: this benchmark at COUNTS (default 8,64)
    with the bench flags that mean the same here (``--ffn`` is the expert size, ``--out`` the JSON);
    flags not given keep this module's defaults (a small Mixtral shape), not the bench's."""
    counts, args, i = DEFAULT_COUNTS, [], 0
    while i < len(argv):
        flag, eq, inline = argv[i].partition("=")
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        given = eq or (value is not None and not value.startswith("-"))
        i += 1 if eq or not given else 2
        if flag == FLAG:
            counts = value if given else DEFAULT_COUNTS
        elif flag == "--large" and value == "none":  # nothing extra to measure: what this runs anyway
            continue
        elif flag == "--overwrite":  # moe-lora bench has let --out replace its file
            i -= 1 if given else 0
        elif flag in BENCH_FLAGS and given:
            args += [BENCH_FLAGS[flag], value]
        else:
            raise ConfigError(f"{flag} does not apply to {FLAG} (it takes {', '.join(BENCH_FLAGS)})")
    return main(["--experts", counts, *args])


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [measure_count(int(e), a) for e in a.experts.split(",")]
    print(table(rows, a))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"settings": vars(a), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
