"""The runner: config -> base model -> adapters -> data -> training -> evaluation -> results.

``run`` is called by the CLI inside a Hydra job with a validated :class:`TrainConfig` and a fresh
run directory. Results are written atomically, so a crashed run never leaves a ``results.json``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from moe_lora.adapters import ADAPTERS
from moe_lora.adapters.base import HookContext
from moe_lora.adapters.inject import count_parameters, expand_targets, inject_adapter
from moe_lora.config import TrainConfig
from moe_lora.data.collate import collate
from moe_lora.data.mixture import Mixture, world_mixture
from moe_lora.data.world import INSTRUCTION_TASKS, World
from moe_lora.errors import ConfigError
from moe_lora.eval.evaluate import evaluate
from moe_lora.layouts import resolve_layout
from moe_lora.models import hub_model, resolve_hub_path, world_model
from moe_lora.routing.recorder import RoutingRecorder
from moe_lora.tracking import Tracker, write_json_atomic
from moe_lora.train.loop import init_state, train

ADAPTER_FILE = "adapter_model.safetensors"
INIT_ADAPTER_FILE = "adapter_init.safetensors"


def validate(cfg: TrainConfig, check_files: bool = True) -> None:
    """Checks across groups, before any model is built; each error names the key. ``check_files``
    also checks that a hub model is available locally (off for parameter accounting)."""
    spec = ADAPTERS.get(cfg.adapter.name)
    if not isinstance(cfg.adapter, spec.config_cls):
        raise ConfigError(f"adapter.name={cfg.adapter.name!r} but conf/adapter uses the schema of "
                          f"{type(cfg.adapter).__name__}; start the YAML with '- /schema/adapter/{spec.name}@_here_'")
    unknown = [t for t in cfg.data.instruction_tasks if t not in INSTRUCTION_TASKS]
    if unknown:
        raise ConfigError(f"data.instruction_tasks={list(cfg.data.instruction_tasks)} has unknown tasks {unknown} "
                          f"(known: {', '.join(INSTRUCTION_TASKS)})")
    if spec.wrap is not None:
        resolve_layout(cfg.layout, cfg.adapter, cfg.model.num_layers)
        expand_targets(cfg.adapter.target_modules, cfg.model.modules)
    if getattr(cfg.adapter, "expert_compute", "dense") == "grouped":
        check_grouped(cfg)
    if check_files and cfg.model.source == "hub":
        resolve_hub_path(cfg.model)  # a missing model fails here, in well under a second
    if check_files and cfg.data.source == "hub":
        raise ConfigError(f"data.source='hub' (data.hub_datasets={list(cfg.data.hub_datasets)}) needs the hub dataset "
                          "loaders, which are not implemented yet; use data=world_mix")


def check_grouped(cfg: TrainConfig) -> None:
    """Grouped GEMMs need 16-byte rows, and compiled they exist in bfloat16 only (torch 2.13)."""
    width = 4 if cfg.model.dtype == "float32" else 2
    if cfg.adapter.rank * width % 16:
        raise ConfigError(f"adapter.rank={cfg.adapter.rank} with adapter.expert_compute=grouped must be a multiple of "
                          f"{16 // width} in model.dtype={cfg.model.dtype} (16-byte rows); use expert_compute=dense")
    if cfg.recipe.compile and cfg.model.dtype != "bfloat16":
        raise ConfigError(f"adapter.expert_compute=grouped with recipe.compile=true needs model.dtype=bfloat16 "
                          f"(compiled grouped GEMMs are bfloat16 only; model.dtype={cfg.model.dtype})")


def load_base(cfg: TrainConfig, world: World, progress: bool = True):
    if cfg.model.source == "world":
        return world_model(cfg.model, world, cfg.cache_dir, progress)
    return hub_model(cfg.model)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters plus adapter buffers (named ``adapter_*``, e.g. ALoRA's active mask)."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state |= {n: b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1].startswith("adapter_")}
    return {n: t.detach().cpu().contiguous() for n, t in state.items()}


def load_adapter(model: nn.Module, path: Path) -> None:
    state = load_file(str(path))
    expected = set(adapter_state(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ConfigError(f"{path} does not fit this config (missing {missing}, unexpected {extra})")
    model.load_state_dict(state, strict=False)


def setup(cfg: TrainConfig, progress: bool = True):
    """Seeded world, base model and mixture (shared by `train` and `eval`)."""
    torch.set_num_threads(cfg.recipe.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    world = World(cfg.data.world)
    model, tok = load_base(cfg, world, progress)
    mixture = world_mixture(cfg.data, world, cfg.seed)
    return world, model, tok, mixture


@torch.no_grad()
def validation_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Cross-entropy on a fixed batch in eval mode (dropout off, routers not recorded)."""
    was_training = model.training
    model.eval()
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    model.train(was_training)
    return float(loss)


def run_eval(model, tok, mixture: Mixture, cfg: TrainConfig) -> dict:
    return evaluate(model, tok, mixture, fast_em=cfg.model.source == "world", limit=cfg.recipe.eval_limit,
                    max_length=cfg.data.max_length)


def run(cfg: TrainConfig, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    start = time.time()
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")
    _, model, tok, mixture = setup(cfg, progress)
    base = run_eval(model, tok, mixture, cfg)
    torch.manual_seed(cfg.seed)  # adapter init depends on the run seed only
    recorder = RoutingRecorder()
    adapted = inject_adapter(model, cfg.adapter, cfg.model, cfg.layout, recorder)
    params = count_parameters(model)
    if cfg.recipe.save_init_adapter:
        save_file(adapter_state(model), str(run_dir / INIT_ADAPTER_FILE))
    tracker = Tracker(run_dir, cfg.logger, resolved, name=run_dir.name)
    results: dict[str, Any] | None = None
    try:
        final_routing: dict[str, dict] = {}

        def log_routing(rows: list[dict]) -> None:
            tracker.log_routing(rows)
            for r in rows:
                final_routing.setdefault(r["module"], {})[r["task_type"]] = r

        spec = ADAPTERS.get(cfg.adapter.name)
        if params["trainable"] > 0:
            state = init_state(model, cfg.recipe, cfg.seed)
            hooks = []
            if spec.make_hook is not None:
                val = collate(mixture.validation[: cfg.recipe.realloc_val_examples], tok, cfg.data.max_length)
                ctx = HookContext(val_loss=lambda: validation_loss(model, val), recipe=cfg.recipe, log=tracker.log)
                hooks.append(spec.make_hook(model, cfg.adapter, ctx))
            train(state, tok, recorder, mixture.train, cfg.recipe, cfg.data.max_length, tracker.log, log_routing,
                  progress, hooks)
        tuned = run_eval(model, tok, mixture, cfg)
        save_file(adapter_state(model), str(run_dir / ADAPTER_FILE))
        results = build_results(cfg, resolved, base, tuned, params, adapted, final_routing, time.time() - start)
        if spec.report is not None:
            results["adapter_report"] = spec.report(model)
        write_json_atomic(run_dir / "results.json", results)
    finally:
        tracker.finish(results)
    return results


def build_results(cfg, resolved, base, tuned, params, adapted, routing, wall) -> dict[str, Any]:
    em_base, em = base["cbqa_em"], tuned["cbqa_em"]
    metrics = {
        "cbqa_em_base": em_base, "cbqa_em": em,
        "cbqa_candidate_acc_base": base["cbqa_candidate_acc"], "cbqa_candidate_acc": tuned["cbqa_candidate_acc"],
        "instruction_em_base": base["instruction_em"], "instruction_em": tuned["instruction_em"],
        "instruction_em_by_task": tuned["instruction_em_by_task"],
        "knowledge_retained": (em / em_base) if em_base else None,
        "n_cbqa": tuned["n_cbqa"], "n_instruction": tuned["n_instruction"],
    }
    final = {m: {**rows["all"], "by_task_type": {t: r for t, r in rows.items() if t != "all"}}
             for m, rows in routing.items() if "all" in rows}
    return {
        "adapter": cfg.adapter.name, "model": cfg.model.name, "data": cfg.data.name, "layout": cfg.layout.name,
        "recipe": cfg.recipe.name, "seed": cfg.seed,
        "params": {**params, "adapted_modules": len(adapted),
                   "trainable_share": params["trainable"] / max(1, params["total"] - params["trainable"])},
        "metrics": metrics, "routing": final, "wall_s": wall, "config": resolved,
        "adapter_config": dataclasses.asdict(cfg.adapter),
    }


def summary_table(results: dict) -> str:
    m, p = results["metrics"], results["params"]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    cvs = [r["cv"] for r in results["routing"].values()]
    rows = [
        ("adapter", results["adapter"]), ("model", results["model"]), ("seed", str(results["seed"])),
        ("trainable params", f"{p['trainable']:,} / {p['total']:,}"),
        ("CBQA EM (base -> tuned)", f"{f(m['cbqa_em_base'])} -> {f(m['cbqa_em'])}"),
        ("CBQA candidate acc", f"{f(m['cbqa_candidate_acc_base'])} -> {f(m['cbqa_candidate_acc'])}"),
        ("knowledge retained", f(m["knowledge_retained"])),
        ("instruction EM (base -> tuned)", f"{f(m['instruction_em_base'])} -> {f(m['instruction_em'])}"),
        *((f"  {t}", f(v)) for t, v in m["instruction_em_by_task"].items()),
        ("routing CV (mean over layers)", f(sum(cvs) / len(cvs)) if cvs else "-"),
        ("wall time", f"{results['wall_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
