"""Re-evaluate a finished run (``moe-lora eval run_dir=...``): its saved config, with overrides, and
its adapter on the base model; writes ``eval-<time>.json`` and its predictions beside the run.

The base model is evaluated again before the adapter goes in, as ``train`` does, so the record
compares base and tuned on the same (possibly overridden) evaluation: knowledge retained included.
``eval-<time>.json`` has results.json's shape (metrics base -> tuned, params, evaluation timings,
the config) without training's routing and throughput, and its summary is the one ``train`` prints.

The run's two files are read before any model loads, so a damaged run (a missing, cut or foreign
``config.yaml`` or ``adapter_model.safetensors``) fails in one line naming the file."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from moe_lora import outputs
from moe_lora.adapters import ADAPTERS
from moe_lora.adapters.inject import count_parameters, inject_adapter
from moe_lora.config import resolved_config
from moe_lora.errors import ConfigError, first_line
from moe_lora.model.structure import read_structure
from moe_lora.recipes.compose import compose, to_config
from moe_lora.recipes.results import build_results
from moe_lora.recipes.runner import ADAPTER_FILE, EvalClock, prepare_trainable, run_eval, setup
from moe_lora.routing.base_router import attach_base_routers
from moe_lora.tracking import write_json_atomic, write_jsonl_atomic
from moe_lora.train.checkpoint import set_adapter


def reevaluate(run_dir: Path, overrides: list[str]) -> tuple[Path, dict]:
    """(the written eval json, its record: what :func:`~moe_lora.recipes.results.summary_table`
    prints)."""
    start = time.time()
    for needed in (outputs.CONFIG, ADAPTER_FILE):
        if not (run_dir / needed).is_file():
            raise ConfigError(f"run_dir={str(run_dir)!r} has no {needed} (not a finished moe-lora run)")
    saved = read_run_config(run_dir / outputs.CONFIG)
    state = read_adapter(run_dir / ADAPTER_FILE)
    dcfg = compose([f"adapter={saved.adapter.name}"])
    cfg = to_config(OmegaConf.merge(dcfg, saved, OmegaConf.from_dotlist(overrides)))
    precision, model, tok, mixture = setup(cfg)
    prepare_trainable(model, cfg, ADAPTERS.get(cfg.adapter.name).trains_base)  # the dtype train evaluated in
    clock = EvalClock()
    with clock.phase("base", model):
        base, base_predictions = run_eval(model, tok, mixture, cfg, precision, progress=True)
    blocks = read_structure(model).moe  # before an expert adapter wraps the experts
    adapted = inject_adapter(model, cfg.adapter, cfg.model, cfg.layout)
    attach_base_routers(model, cfg.model.moe, None, blocks)  # the trained base router / null experts train saved
    set_adapter(model, state, run_dir / ADAPTER_FILE)
    with clock.phase("tuned", model):
        tuned, predictions = run_eval(model, tok, mixture, cfg, precision, progress=True)
    wall = time.time() - start
    record = build_results(cfg, resolved_config(cfg), base, tuned, count_parameters(model), adapted, {}, wall)
    record = {"run_dir": str(run_dir), **record, "perf": {"eval": clock.summary(wall)}}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = run_dir / f"eval-{stamp}.json"
    hint = "make the run folder writable"
    rows = [{"model": "base", **r} for r in base_predictions] + [{"model": "tuned", **r} for r in predictions]
    write_jsonl_atomic(run_dir / f"eval-{stamp}-predictions.jsonl", rows, hint)
    write_json_atomic(out, record, hint)
    return out, record


def read_run_config(path: Path) -> DictConfig:
    """A run's ``config.yaml``: a mapping with ``adapter.name`` (what composing it again needs)."""
    try:
        saved = OmegaConf.load(path)
    except Exception as exc:  # yaml's ScannerError / ParserError, UnicodeDecodeError, OSError, ...
        raise ConfigError(f"{path} cannot be read ({first_line(exc, 160)}): the run is damaged") from None
    if not isinstance(saved, DictConfig) or not isinstance(OmegaConf.select(saved, "adapter.name"), str):
        raise ConfigError(f"{path} has no adapter.name: the run is damaged or not a moe-lora run")
    return saved


def read_adapter(path: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a run; a cut or foreign file is one line naming it."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' SafetensorError (cut header, bad offsets), OSError
        raise ConfigError(f"{path} cannot be read ({first_line(exc, 160)}): the run is damaged") from None
