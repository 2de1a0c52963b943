"""Re-evaluate a finished run (``moe-lora eval run_dir=...``): its saved config, with overrides, and
its adapter on the base model; writes ``eval-<time>.json`` and its predictions beside the run.

The run's two files are read before any model loads, so a damaged run (a missing, cut or foreign
``config.yaml`` or ``adapter_model.safetensors``) fails in one line naming the file."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from moe_lora import outputs
from moe_lora.adapters.inject import inject_adapter
from moe_lora.compose import compose, to_config
from moe_lora.errors import ConfigError, first_line
from moe_lora.tracking import write_json_atomic, write_jsonl_atomic
from moe_lora.train.checkpoint import set_adapter
from moe_lora.train.runner import ADAPTER_FILE, run_eval, setup


def reevaluate(run_dir: Path, overrides: list[str]) -> tuple[Path, dict]:
    """(the written eval json, its metrics)."""
    for needed in (outputs.CONFIG, ADAPTER_FILE):
        if not (run_dir / needed).is_file():
            raise ConfigError(f"run_dir={str(run_dir)!r} has no {needed} (not a finished moe-lora run)")
    saved = read_run_config(run_dir / outputs.CONFIG)
    state = read_adapter(run_dir / ADAPTER_FILE)
    dcfg = compose([f"adapter={saved.adapter.name}"])
    cfg = to_config(OmegaConf.merge(dcfg, saved, OmegaConf.from_dotlist(overrides)))
    precision, model, tok, mixture = setup(cfg)
    inject_adapter(model, cfg.adapter, cfg.model, cfg.layout)
    set_adapter(model, state, run_dir / ADAPTER_FILE)
    metrics, predictions = run_eval(model, tok, mixture, cfg, precision, progress=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = run_dir / f"eval-{stamp}.json"
    hint = "make the run folder writable"
    rows = [{"model": "tuned", **r} for r in predictions]
    write_jsonl_atomic(run_dir / f"eval-{stamp}-predictions.jsonl", rows, hint)
    write_json_atomic(out, {"run_dir": str(run_dir), "metrics": metrics}, hint)
    return out, metrics


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
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' SafetensorError (cut header, bad offsets), OSError
        raise ConfigError(f"{path} cannot be read ({first_line(exc, 160)}): the run is damaged") from None
