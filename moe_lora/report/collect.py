"""Find runs below some paths: finished ones (results.json) and failed ones (no results.json)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from moe_lora import outputs


@dataclass
class Run:
    path: Path
    results: dict | None  # None: the run failed or never finished
    routing: list[dict] = field(default_factory=list)
    error: str | None = None

    @property
    def label(self) -> str:
        """The row a run belongs to: ``label`` from its config, else adapter (+ layout)."""
        cfg = (self.results or {}).get("config", {})
        if cfg.get("label"):
            return str(cfg["label"])
        adapter, layout = (self.results or {}).get("adapter", "?"), (self.results or {}).get("layout", "uniform")
        return adapter if layout in ("uniform", None) else f"{adapter}/{layout}"


def _is_run_dir(path: Path) -> bool:
    """A moe-lora run folder (Hydra's own ``.hydra`` folders and other hidden ones are not)."""
    if path.name.startswith("."):
        return False
    return any((path / f).exists() for f in (outputs.RESULTS, outputs.FAILURE, outputs.CONFIG))


def _natural(path: Path) -> list:
    """Sort ``2_x`` before ``10_x`` (Hydra numbers its jobs)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def collect(paths: list[Path]) -> list[Run]:
    """Every run directory below ``paths`` (the report folder itself is skipped)."""
    dirs: set[Path] = set()
    for root in paths:
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such file or directory")
        candidates = [root, *root.rglob("*")] if root.is_dir() else [root.parent]
        dirs |= {
            d
            for d in candidates
            if d.is_dir()
            and _is_run_dir(d)
            and not any(p == "report" or p.startswith(".") for p in d.parts[len(root.parts) :])
        }
    runs = []
    for d in sorted(dirs, key=_natural):
        if (d / outputs.RESULTS).exists():
            routing = (
                [json.loads(x) for x in (d / outputs.ROUTING).read_text().splitlines() if x.strip()]
                if (d / outputs.ROUTING).exists()
                else []
            )
            runs.append(Run(d, json.loads((d / outputs.RESULTS).read_text()), routing))
        else:
            err = None
            if (d / outputs.FAILURE).exists():
                err = json.loads((d / outputs.FAILURE).read_text()).get("error")
            runs.append(Run(d, None, error=err or "no results.json (failed or still running)"))
    return runs
