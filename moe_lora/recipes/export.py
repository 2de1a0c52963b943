"""Export a trained run (``moe-lora export``): merged into the base, peft's adapter format, or
moe_lora's own self-contained folder (``docs/export-format.md``).

- ``merged``: every adapted linear's update folded into its weight, the wrappers replaced by the
  base linears, saved with ``save_pretrained`` (a plain transformers checkpoint plus tokenizer).
  Exact only where the update does not depend on the input: LoRA, ALoRA (gate x active mask folded
  into A), MELoRA (block-diagonal update), IA3 (a row or column scaling), full fine-tuning. A routed
  variant weighs its experts per token, so no single weight equals it: it is refused.
- ``peft``: LoRA-type updates as peft LoRA (MELoRA as the block-diagonal LoRA of rank n*r it is,
  ALoRA as its active components with the gates folded into A; per-module ranks in
  ``rank_pattern``, scalings in ``alpha_pattern``) and IA3 as peft IA3.
- ``moe_lora``: the run's adapter tensors, an ``adapter_config.json`` (variant, targets, adapted
  modules, layout, base model, the resolved config), the run's ``results.json`` and a model card.

Every format is written to a temporary folder beside ``--out`` and swapped in (``atomic_dir``), so
a failed export leaves nothing half-written; an existing ``--out`` is replaced only with
``--overwrite`` and only when an earlier export made it (its ``.moe_lora_export`` marker).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi
from peft import IA3Config, LoraConfig
from safetensors.torch import save_file
from torch import nn

from moe_lora import outputs
from moe_lora.adapters.merging import (
    adapted_modules,
    ia3_scales,
    lora_factors,
    merge,
    refuse_routed,
    routed_error,
    transposed,
)
from moe_lora.config import resolved_config
from moe_lora.errors import ConfigError
from moe_lora.model.gguf import cache_entry
from moe_lora.model.layouts import resolve_layout
from moe_lora.model.structure import is_encoder_decoder
from moe_lora.outputs import atomic_dir
from moe_lora.recipes.api import EXPORT_CONFIG, FORMAT, Saved, build, read_saved
from moe_lora.recipes.export_card import model_card
from moe_lora.world.model import cache_key

FORMATS = ("merged", "peft", "moe_lora")
MARKER = ".moe_lora_export"  # in every folder `moe-lora export` writes: --overwrite replaces only those
FORMAT_VERSION = 1


def write_merged(model: nn.Module, tok: Any, variant: str, folder: Path) -> None:
    merge(model, variant)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


# ---------------------------------------------------------------------------- peft
def base_path(cfg: Any) -> str:
    """What the base is called for another tool: the hub id, or an absolute folder (a local model
    or the cached world model or dequantized GGUF file), so the export loads from any working directory."""
    if cfg.model.source == "hub" and cfg.model.gguf_file:
        return str(cache_entry(cfg.model, cfg.cache_dir).resolve())
    if cfg.model.source == "hub":
        local = Path(str(cfg.model.name_or_path)).expanduser()
        return str(local.resolve()) if local.exists() else str(cfg.model.name_or_path)

    return str((Path(cfg.cache_dir) / f"world-model-{cache_key(cfg.data.world, cfg.model)}").resolve())


def peft_lora(model: nn.Module, cfg: Any, task_type: str):
    """(peft LoraConfig, tensors) of every unrouted LoRA-type layer."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    fan_in_fan_out = False
    for name, mod in adapted_modules(model).items():
        A, B, s = lora_factors(mod)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.T.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.T.contiguous()
        ranks[name], alphas[name] = A.shape[1], s * A.shape[1]  # peft's scaling is lora_alpha / r
        fan_in_fan_out |= transposed(mod.base)
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = next(a for n, a in alphas.items() if ranks[n] == r)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(ranks),
        rank_pattern={n: k for n, k in ranks.items() if k != r},
        alpha_pattern={n: a for n, a in alphas.items() if not math.isclose(a, alpha, rel_tol=1e-9)},
        lora_dropout=float(getattr(cfg.adapter, "dropout", 0.0)),
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type=task_type,
        base_model_name_or_path=base_path(cfg),
        inference_mode=True,
    )
    return config, tensors


def peft_ia3(model: nn.Module, cfg: Any, task_type: str):
    """(peft IA3Config, tensors): output-site vectors as (d_out, 1), input-site as (1, d_in)."""
    tensors: dict[str, torch.Tensor] = {}
    targets, feedforward = [], []
    for name, mod in adapted_modules(model).items():
        scales = ia3_scales(mod)
        if scales is None or scales[0][2] is not None:
            raise ConfigError(
                f"adapter={cfg.adapter.name}: {name} scales some columns of a fused linear, which peft's IA3 "
                "cannot (it scales whole modules); use --format moe_lora or merged"
            )
        site, vec, _ = scales[0]
        targets.append(name)
        if site == "input":
            feedforward.append(name)
        tensors[f"base_model.model.{name}.ia3_l"] = vec.view(1, -1) if site == "input" else vec.view(-1, 1)
    config = IA3Config(
        target_modules=targets,
        feedforward_modules=feedforward,
        fan_in_fan_out=any(transposed(m.base) for m in adapted_modules(model).values()),
        task_type=task_type,
        base_model_name_or_path=base_path(cfg),
        inference_mode=True,
    )
    return config, tensors


def write_peft(model: nn.Module, cfg: Any, folder: Path) -> None:
    variant = cfg.adapter.name
    refuse_routed(model, variant, "peft")
    modules = adapted_modules(model)
    task_type = "SEQ_2_SEQ_LM" if is_encoder_decoder(model) else "CAUSAL_LM"
    if modules and all(lora_factors(m) is not None for m in modules.values()):
        config, tensors = peft_lora(model, cfg, task_type)
    elif modules and all(ia3_scales(m) is not None for m in modules.values()):
        config, tensors = peft_ia3(model, cfg, task_type)
    else:
        raise ConfigError(
            f"adapter={variant} has no peft equivalent (peft's format holds LoRA-type adapters and IA3); "
            "use --format moe_lora" + (" or merged" if variant == "full" else "")
        )
    config.save_pretrained(str(folder))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------- moe_lora
def layout_plans(cfg: Any) -> list[dict[str, Any]]:
    """The layout resolved per layer (experts, rank, top-k), as injection resolved it."""
    try:
        plans = resolve_layout(cfg.layout, cfg.adapter, cfg.model.num_layers)
    except ConfigError:
        return []
    return [{"layer": i, "num_experts": p.num_experts, "rank": p.rank, "top_k": p.top_k} for i, p in enumerate(plans)]


def export_config(saved: Saved, adapted: list[str]) -> dict[str, Any]:
    """``adapter_config.json`` of the moe_lora format (docs/export-format.md)."""
    cfg = saved.cfg
    resolved = resolved_config(cfg)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": cfg.adapter.name,
        "base_model": {
            "source": cfg.model.source,
            "name_or_path": base_path(cfg),
            "name": cfg.model.name,
            "family": cfg.model.family,
            "dtype": cfg.model.dtype,
        },
        "targets": list(cfg.adapter.target_modules),
        "adapted_modules": adapted,
        "layout": {"name": cfg.layout.name, "per_layer": layout_plans(cfg)},
        "adapter": resolved["adapter"],
        "tensors": outputs.ADAPTER,
        "config": resolved,
    }


def write_moe_lora(saved: Saved, adapted: list[str], folder: Path) -> None:
    shutil.copyfile(saved.folder / outputs.ADAPTER, folder / outputs.ADAPTER)
    results = read_results(saved.folder)
    if results is not None:
        (folder / outputs.RESULTS).write_text(json.dumps(results, indent=1))
    meta = export_config(saved, adapted)
    (folder / EXPORT_CONFIG).write_text(json.dumps(meta, indent=1))
    (folder / "README.md").write_text(model_card(meta, results))


def read_results(folder: Path) -> dict[str, Any] | None:
    path = folder / outputs.RESULTS
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------- the command
def check_out(out: Path, overwrite: bool) -> None:
    """An existing ``--out`` is replaced only with ``--overwrite``, and only an earlier export."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise ConfigError(f"--out {out} exists: pass --overwrite to replace it")
    if not (out / MARKER).is_file():
        raise ConfigError(
            f"--out {out} exists and was not written by moe-lora export (no {MARKER}): "
            "moe-lora replaces only its own exports; remove it or choose another --out"
        )


def check_push(repo: str | None) -> None:
    """Uploading needs the network: with downloads off it fails before anything is exported."""
    if repo and os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false", "False"):
        raise ConfigError(
            f"--push-to-hub {repo} needs the network, but HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '1')} "
            "(moe-lora is offline unless HF_HUB_OFFLINE=0 is set): set HF_HUB_OFFLINE=0, or export and upload later"
        )


def export(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    device: str = "cpu",
) -> Path:
    """Write ``run_dir``'s adapter to ``out`` in ``fmt``; returns ``out``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = Path(out)
    check_push(push_to_hub)
    check_out(out, overwrite)
    saved = read_saved(run_dir)
    if fmt in ("merged", "peft"):
        _refuse_routed_early(saved, fmt)
    model, tok, _ = build(saved, device)
    with atomic_dir(out) as tmp:
        if fmt == "merged":
            write_merged(model, tok, saved.cfg.adapter.name, tmp)
        elif fmt == "peft":
            write_peft(model, saved.cfg, tmp)
        else:
            write_moe_lora(saved, model._moe_lora.adapted, tmp)
        marker = {"format": fmt, "source": str(Path(run_dir).resolve()), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / MARKER).write_text(json.dumps(marker))
    if push_to_hub:
        upload(out, push_to_hub)
    return out


def _refuse_routed_early(saved: Saved, fmt: str) -> None:
    """Routed variants are refused before the base model loads (their tensors name a router)."""
    if any(name.endswith("router.weight") for name in saved.state):
        routed_error(saved.cfg.adapter.name, fmt)


def upload(folder: Path, repo: str) -> None:
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, ignore_patterns=[MARKER])
