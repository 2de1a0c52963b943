"""Re-evaluate a finished run (``moe-lora eval run_dir=...``): its saved config, with overrides, and
its adapter on the base model; writes ``eval-<time>.json`` and its predictions beside the run."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from moe_lora import outputs
from moe_lora.adapters.inject import inject_adapter
from moe_lora.compose import compose, to_config
from moe_lora.errors import ConfigError
from moe_lora.tracking import write_json_atomic, write_jsonl_atomic
from moe_lora.train.checkpoint import load_adapter
from moe_lora.train.runner import ADAPTER_FILE, run_eval, setup


def reevaluate(run_dir: Path, overrides: list[str]) -> tuple[Path, dict]:
    """(the written eval json, its metrics)."""
    for needed in (outputs.CONFIG, ADAPTER_FILE):
        if not (run_dir / needed).exists():
            raise ConfigError(f"run_dir={str(run_dir)!r} has no {needed} (not a finished moe-lora run)")
    saved = OmegaConf.load(run_dir / outputs.CONFIG)
    dcfg = compose([f"adapter={saved.adapter.name}"])
    cfg = to_config(OmegaConf.merge(dcfg, saved, OmegaConf.from_dotlist(overrides)))
    precision, model, tok, mixture = setup(cfg)
    inject_adapter(model, cfg.adapter, cfg.model, cfg.layout)
    load_adapter(model, run_dir / ADAPTER_FILE)
    metrics, predictions = run_eval(model, tok, mixture, cfg, precision, progress=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = run_dir / f"eval-{stamp}.json"
    write_jsonl_atomic(run_dir / f"eval-{stamp}-predictions.jsonl", [{"model": "tuned", **r} for r in predictions])
    write_json_atomic(out, {"run_dir": str(run_dir), "metrics": metrics})
    return out, metrics
