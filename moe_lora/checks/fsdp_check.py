"""FSDP2 on one rank: the preset's adapted model sharded with the runner's own
:func:`moe_lora.train.distributed.shard_fsdp` over a process group of one, trained a few steps, and
compared with the same steps unsharded.

Why a check of its own: with one rank ``moe-lora train`` never shards (``recipe.strategy`` applies
to data parallel runs: ``Dist.enabled`` needs two ranks), so a one-GPU machine would otherwise
never put the frozen bf16 base and the float32 adapters through ``fully_shard``. With one shard
the arithmetic is the unsharded model's, so the losses must agree to rounding.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from moe_lora.adapters.inject import inject_adapter
from moe_lora.bench import measure
from moe_lora.checks.train_check import EXPERIMENT, RTOL, CheckFailure
from moe_lora.recipes.compose import load_config
from moe_lora.routing.recorder import RoutingRecorder
from moe_lora.train.distributed import shard_fsdp
from moe_lora.train.precision import peak_memory_bytes


def adapted_model(model_dir: Path, device: str, overrides: list[str]):
    """The checkpoint with the preset's adapter (dropout off: both passes must draw nothing);
    ``overrides``: the check's other settings (data.root: the config is validated whole)."""
    cfg = load_config([*EXPERIMENT, *overrides, f"model.name_or_path={model_dir}", f"recipe.device={device}"])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, cfg.model.dtype)).to(device)
    model.requires_grad_(False)
    recorder = RoutingRecorder()
    torch.manual_seed(0)
    inject_adapter(model, replace(cfg.adapter, dropout=0.0), cfg.model, cfg.layout, recorder)
    return model, recorder, getattr(torch, cfg.model.dtype)


def train_losses(model, recorder, batch: dict[str, torch.Tensor], steps: int, dtype: torch.dtype) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    case = measure.Case(model, torch.optim.AdamW(params, lr=1e-3), recorder, telemetry=True, autocast=dtype)
    return [float(measure.train_step(case, batch)) for _ in range(steps)]


def one_rank_group(device: str) -> None:
    """A process group of this process alone (an in-memory store: no port, no environment)."""
    if dist.is_initialized():
        raise CheckFailure("a process group is already initialised in this process")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device).index or 0)
    dist.init_process_group(
        "nccl" if device.startswith("cuda") else "gloo", store=dist.HashStore(), rank=0, world_size=1
    )


def fsdp_one_rank(
    model_dir: Path, device: str, batch: int, seq: int, steps: int, overrides: list[str]
) -> dict[str, Any]:
    model, recorder, dtype = adapted_model(model_dir, device, overrides)
    data = measure.make_batch(run_args(batch, seq, model.config.vocab_size, device))
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    plain = train_losses(model, recorder, data, steps, dtype)
    with torch.no_grad():  # back to the same adapter init for the sharded pass
        for n, p in model.named_parameters():
            if n in init:
                p.copy_(init[n])
    one_rank_group(device)
    try:
        shard_fsdp(model)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        sharded = train_losses(model, recorder, data, steps, dtype)
        seconds = time.perf_counter() - t0
        is_sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    finally:
        dist.destroy_process_group()
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(sharded, plain, strict=True))
    out = {
        "losses_unsharded": plain,
        "losses_fsdp": sharded,
        "bitwise": sharded == plain,
        "max_loss_rel_diff": rel,
        "rtol": RTOL,
        "parameters_are_dtensors": is_sharded,
        "tokens_per_s": batch * seq * steps / seconds,
        "peak_mem_bytes": peak_memory_bytes(torch.device(device)),
    }
    if not is_sharded:
        raise CheckFailure("fully_shard left no DTensor parameter: the model was not sharded")
    if rel > RTOL:
        raise CheckFailure(f"FSDP losses differ from unsharded by {rel:.2e} (relative) > {RTOL}")
    return out


def run_args(batch: int, seq: int, vocab: int, device: str):
    return argparse.Namespace(batch=batch, seq=seq, vocab=vocab, device=device)
