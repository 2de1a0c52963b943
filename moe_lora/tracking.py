"""Run logging: JSONL files in the run directory (always), plus Weights & Biases when enabled.

W&B is always started with an explicit mode and its files under the run directory, so it never
prompts for a key and never blocks on a missing network (``offline`` is the default mode).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from moe_lora.config import LoggerConfig


def _write_atomic(path: Path, write: Callable[[TextIO], None]) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"))


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """One JSON object per line (predictions.jsonl), written atomically."""
    _write_atomic(path, lambda f: f.writelines(json.dumps(row) + "\n" for row in rows))


class Tracker:
    """``metrics.jsonl`` (step, loss, aux_loss, lr), ``routing.jsonl`` (statistics per window)."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict, name: str) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the run, closed in finish)
        self._routing = open(run_dir / "routing.jsonl", "a")  # noqa: SIM115
        self._wandb = None
        if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity, mode=cfg.wandb.mode, dir=str(run_dir),
                name=name, config=config, tags=list(cfg.wandb.tags), reinit="finish_previous",
                settings=wandb.Settings(console="off", silent=True),
            )

    def log(self, row: dict) -> None:
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def log_routing(self, rows: list[dict]) -> None:
        for row in rows:
            self._routing.write(json.dumps(row) + "\n")
        self._routing.flush()
        if self._wandb is not None and rows:
            data = {f"routing/cv/{r['module']}": r["cv"] for r in rows if r["task_type"] == "all"}
            data |= {f"routing/entropy/{r['module']}": r["entropy"] for r in rows if r["task_type"] == "all"}
            self._wandb.log(data, step=rows[0]["step"])

    def finish(self, results: dict | None = None) -> None:
        self._metrics.close()
        self._routing.close()
        if self._wandb is not None:
            if results is not None:
                self._wandb.summary.update({f"metrics/{k}": v for k, v in results.get("metrics", {}).items()
                                            if isinstance(v, (int, float))})
            self._wandb.finish()
