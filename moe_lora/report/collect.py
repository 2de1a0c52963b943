"""Find runs below some paths: finished ones (results.json), failed ones (no results.json) and
unreadable ones (a results, routing or failure file cut short or not JSON: listed, never a crash)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from moe_lora import outputs
from moe_lora.errors import first_line

log = logging.getLogger(__name__)
UNREADABLE = "unreadable:"  # the error of a run whose files are damaged (``Run.unreadable``)


@dataclass
class Run:
    path: Path
    results: dict | None  # None: the run failed or never finished
    routing: list[dict] = field(default_factory=list)
    error: str | None = None

    @property
    def unreadable(self) -> bool:
        """A file the report needs is damaged (``error`` names it)."""
        return (self.error or "").startswith(UNREADABLE)

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
    return [read_run(d) for d in sorted(dirs, key=_natural)]


class Unreadable(Exception):
    """A run file that exists but cannot be read (cut short, not JSON, not a file); the message
    names the file."""


def _reason(exc: Exception) -> str:
    """An ``OSError``'s reason without the path it repeats, else the error's first line."""
    return (exc.strerror if isinstance(exc, OSError) else None) or first_line(exc, 120)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or :class:`Unreadable` naming it."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise Unreadable(f"{path} ({_reason(exc)})") from None
    if not isinstance(value, dict):
        raise Unreadable(f"{path} (not a JSON object)")
    return value


REQUIRED = ("metrics", "params", "seed", "wall_s")  # what every table reads of a results.json


def read_results(path: Path) -> dict:
    """A run's results.json, with the keys every table reads."""
    results = read_json(path)
    missing = [k for k in REQUIRED if k not in results]
    if missing:
        raise Unreadable(f"{path} (no {', '.join(missing)}: not a moe-lora results file)")
    return results


def read_rows(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file (none if it does not exist), or :class:`Unreadable` naming
    it and the first bad line."""
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError) as exc:
        raise Unreadable(f"{path} ({_reason(exc)})") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise Unreadable(f"{path} (line {i}: {_reason(exc)})") from None
        if not isinstance(row, dict):
            raise Unreadable(f"{path} (line {i}: not a JSON object)")
        rows.append(row)
    return rows


def read_run(d: Path) -> Run:
    """One run folder: finished (results.json and routing.jsonl read), failed, or unreadable (a file
    the report needs is damaged: listed with the failed runs, naming the file, and the rest of the
    report is written)."""
    try:
        if (d / outputs.RESULTS).exists():
            return Run(d, read_results(d / outputs.RESULTS), read_rows(d / outputs.ROUTING))
        err = read_json(d / outputs.FAILURE).get("error") if (d / outputs.FAILURE).exists() else None
    except Unreadable as exc:
        log.warning("unreadable run file: %s", exc)
        return Run(d, None, error=f"{UNREADABLE} {exc}")
    return Run(d, None, error=str(err) if err else "no results.json (failed or still running)")
