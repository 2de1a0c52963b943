"""Run logging: JSONL files in the run directory (always), plus Weights & Biases when enabled.

W&B is always started with an explicit mode and its files under the run directory, so it never
prompts for a key and never blocks on a missing network (``offline`` is the default mode). W&B is a
mirror, never the record: when it fails (``init``, ``log`` or ``finish`` raising: an unwritable
offline folder, no network online) the run warns once and goes on with the JSONL files alone. The
JSONL files are the record, so a failure to write them (a full disk, an unwritable folder) stops the
run with an :class:`OutputError` naming the file. Files written whole (results.json,
predictions.jsonl, the adapter, config.yaml, evaluations) go through :func:`atomic_path`: a
temporary file renamed into place with the mode of the logs (0644 under the usual umask).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from moe_lora import outputs
from moe_lora.config import LoggerConfig
from moe_lora.errors import OutputError, first_line

log = logging.getLogger(__name__)


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask (0644 under the usual 022).
    ``mkstemp`` creates 0600 and safetensors writes through a 0600 temporary file of its own; files
    renamed into a run folder get this mode instead, so they are as readable as the logs beside them."""
    return 0o666 & ~outputs.umask()


_OS_ERROR = re.compile(r"os error (\d+)|Os \{ code: (\d+)")  # safetensors (Rust): >= 0.5 and older


def write_reason(exc: BaseException) -> str | None:
    """Why a write failed when ``exc`` is an I/O failure (None for any other error): an ``OSError``'s
    text, safetensors' ``SafetensorError`` carrying an OS error code, torch's ``file write failed``
    (a ``RuntimeError`` without an errno: how ``torch.save`` reports a full disk)."""
    if isinstance(exc, OSError):
        return exc.strerror or first_line(exc)
    text = str(exc)
    if m := _OS_ERROR.search(text):
        return os.strerror(int(m.group(1) or m.group(2)))
    if "file write failed" in text:
        return "the write failed (is the disk full?)"
    return None


RUN_HINT = "choose a writable hydra.run.dir"  # what a user can do besides freeing space (a new run)


def output_error(path: Path, exc: BaseException, hint: str = RUN_HINT) -> OutputError:
    reason = write_reason(exc) or first_line(exc)
    return OutputError(f"cannot write {path}: {reason} (free space, or {hint})")


@contextlib.contextmanager
def atomic_path(path: Path, hint: str = RUN_HINT) -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to write (by name: safetensors, OmegaConf,
    torch), renamed onto ``path`` with :func:`file_mode` when the block ends. Readers never see half
    a file; a failed write (a full disk) leaves the previous version in place and no temporary file;
    an I/O failure of any writer (:func:`write_reason`) is one :class:`OutputError` naming ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise output_error(path, exc, hint) from exc
    tmp = Path(name)
    try:
        yield tmp
        with contextlib.suppress(OSError):  # a file system without modes (some network mounts) still gets the file
            os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if write_reason(exc) is not None:
            raise output_error(path, exc, hint) from exc
        raise


def _write_atomic(path: Path, write: Callable[[TextIO], None], hint: str = RUN_HINT) -> None:
    with atomic_path(path, hint) as tmp, open(tmp, "w") as f:
        write(f)


def write_text_atomic(path: Path, text: str, hint: str = RUN_HINT) -> None:
    _write_atomic(path, lambda f: f.write(text), hint)


def write_json_atomic(path: Path, obj: Any, hint: str = RUN_HINT) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), hint)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file (none if it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_jsonl_atomic(path: Path, rows: list[dict], hint: str = RUN_HINT) -> None:
    """One JSON object per line (predictions.jsonl), written atomically."""
    _write_atomic(path, lambda f: f.writelines(json.dumps(row) + "\n" for row in rows), hint)


class JsonlFile:
    """An append-only JSONL file, written unbuffered one call at a time. A write that fails part way
    (disk full) is cut back to the file's previous length, so the file only ever holds whole lines
    and its byte length marks a position a resume can truncate to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = open(path, "ab", buffering=0)  # noqa: SIM115 (open for the run, closed in close)
        except OSError as exc:
            raise output_error(path, exc) from exc

    def append(self, rows: list[dict]) -> None:
        data = memoryview("".join(json.dumps(row) + "\n" for row in rows).encode())
        fd = self._file.fileno()
        size = None
        try:
            size = os.fstat(fd).st_size
            while data:
                data = data[self._file.write(data) :]
        except OSError as exc:
            if size is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
            raise output_error(self.path, exc) from exc

    def close(self) -> None:
        self._file.close()  # unbuffered: nothing is left to flush, so closing cannot fail on a full disk


class Tracker:
    """``metrics.jsonl`` (step, loss, aux_loss, lr), ``routing.jsonl`` (statistics per window)."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict, name: str) -> None:
        self.run_dir = run_dir
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(run_dir, exc) from exc
        self._metrics = JsonlFile(run_dir / outputs.METRICS)
        try:
            self._routing = JsonlFile(run_dir / outputs.ROUTING)
        except OutputError:
            self._metrics.close()
            raise
        self._wandb = None
        if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            self._wandb = self._wandb_call("wandb.init", _wandb_init, cfg, run_dir, config, name)

    def _wandb_call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``; when it raises, W&B is off for the rest of the run, with one warning."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # wandb raises its own errors, OSError, ConnectionError, ...
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            log.warning(
                "%s failed (%s%s); W&B is off for the rest of this run, metrics.jsonl and routing.jsonl in %s go on",
                what,
                type(exc).__name__,
                f": {detail}" if detail else "",
                self.run_dir,
            )
            run, self._wandb = self._wandb, None
            if run is not None and what != "wandb.finish":  # end its background process; it failed once already
                with contextlib.suppress(Exception):
                    run.finish(exit_code=1)
            return None

    def lengths(self) -> dict[str, int]:
        """Byte lengths of the JSONL logs (a checkpoint records them; a resume cuts back to them)."""
        return {f.path.name: f.path.stat().st_size for f in (self._metrics, self._routing)}

    def log(self, row: dict) -> None:
        self._metrics.append([row])
        if self._wandb is not None:
            self._wandb_call(
                "wandb.log", self._wandb.log, {f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"]
            )

    def log_routing(self, rows: list[dict]) -> None:
        self._routing.append(rows)
        if self._wandb is not None and rows:
            data = {f"routing/cv/{r['module']}": r["cv"] for r in rows if r["task_type"] == "all"}
            data |= {f"routing/entropy/{r['module']}": r["entropy"] for r in rows if r["task_type"] == "all"}
            self._wandb_call("wandb.log", self._wandb.log, data, step=rows[0]["step"])

    def finish(self, results: dict | None = None) -> None:
        try:
            self._metrics.close()
            self._routing.close()
        finally:
            if self._wandb is not None:
                self._wandb_call("wandb.finish", _wandb_finish, self._wandb, results)
                self._wandb = None


def _wandb_init(cfg: LoggerConfig, run_dir: Path, config: dict, name: str):
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    return wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        mode=cfg.wandb.mode,
        dir=str(run_dir),
        name=name,
        config=config,
        tags=list(cfg.wandb.tags),
        reinit="finish_previous",
        settings=wandb.Settings(console="off", silent=True),
    )


def offline_note(run) -> str | None:
    """Where an offline W&B run went and the command that uploads it (W&B, kept silent, says
    neither); ``None`` for an online run."""
    if not getattr(run, "offline", False):
        return None
    folder = getattr(getattr(run, "settings", None), "sync_dir", None) or str(Path(run.dir).parent)
    return f"W&B run saved offline in {folder}; upload it with: wandb sync {folder}"


def _wandb_finish(run, results: dict | None) -> None:
    note = offline_note(run)
    try:
        if results is not None:
            run.summary.update(
                {f"metrics/{k}": v for k, v in results.get("metrics", {}).items() if isinstance(v, (int, float))}
            )
    finally:
        run.finish()
    if note:
        print(note, flush=True)


@contextlib.contextmanager
def cache_writes(entry: Path) -> Iterator[None]:
    """A cache that cannot be written (a full disk, an unwritable ``cache_dir``) is one line naming
    the entry; errors that are not I/O pass through. Shared by the world model's and the GGUF cache."""
    try:
        yield
    except Exception as exc:
        if write_reason(exc) is None:
            raise
        raise output_error(entry, exc, "choose a writable cache_dir") from exc
