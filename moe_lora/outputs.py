"""The outputs room: the name of every file a run writes, and the plain helpers shared by the code
that writes them (training) and the code that reads them (the report).

Nothing here imports training code, so the report can use it and still read result files only.
It also says which folders moe-lora may reuse or replace: a run folder carries a marker and, while
a job runs in it, a lock; a report folder carries a marker. Nothing moe-lora did not make is ever
emptied or replaced.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from moe_lora.errors import ConfigError

CONFIG = "config.yaml"  # the resolved config
RESULTS = "results.json"  # metrics, parameters, routing, perf, targets (written last, atomically)
METRICS = "metrics.jsonl"  # loss / lr lines and perf lines
ROUTING = "routing.jsonl"  # one line per (step, module, task type)
PREDICTIONS = "predictions.jsonl"  # every evaluated example of the base and the tuned model
FAILURE = "failure.json"  # a failed job's error and traceback
ADAPTER = "adapter_model.safetensors"  # the trained adapter tensors
INIT_ADAPTER = "adapter_init.safetensors"  # the adapter at init (recipe.save_init_adapter)
CHECKPOINTS = "checkpoints"  # checkpoints/step-<n>/
RUN_FILES = (FAILURE, METRICS, ROUTING, PREDICTIONS, CONFIG, ADAPTER, INIT_ADAPTER)  # an attempt's, before results
RUN_MARKER = ".moe_lora_run"  # JSON in every run folder moe-lora makes: the version and time that made it
RUN_LOCK = ".moe_lora.lock"  # flock'ed by the process running a job in the folder; holds its pid and host
REPORT_MARKER = ".moe_lora_report"  # in every report folder: `report --out` replaces only such folders
HYDRA_FILES = (".hydra", "train.log", "moe_lora.log")  # what Hydra makes in a run folder before the job

# Settings that never change what training computes: left out of the checkpoint's config hash (a
# resume may change them) and of the report's "arms differ in" warnings. Keys or key prefixes.
NOT_TRAINING = (
    "logger",
    "eval",
    "label",
    "claims",
    "resume",
    "run_dir",
    "cache_dir",
    "recipe.save_every",
    "recipe.keep_checkpoints",
    "recipe.keep_final_state",
    "recipe.threads",
    "recipe.device",
    "recipe.eval_limit",
    "recipe.on_nonfinite",
    "recipe.val_every",  # validation never changes training (tests/train/test_val_loss.py)
    "recipe.val_batches",
    "recipe.objective",
    "recipe.objectives",
    "recipe.nproc_per_node",
    "recipe.name",
    "data.num_proc",
    "eval.harness",
)


def changes_training(key: str) -> bool:
    """Whether a dotted config key can change training (not one of :data:`NOT_TRAINING`)."""
    return not any(key == n or key.startswith(n + ".") for n in NOT_TRAINING)


def flatten(d: dict, prefix: str = "", keep_empty: bool = False) -> dict[str, Any]:
    """Nested config -> ``{"recipe.max_steps": 450, ...}``; ``keep_empty`` keeps ``{}`` values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and (v or not keep_empty):
            out |= flatten(v, f"{prefix}{k}.", keep_empty)
        else:
            out[f"{prefix}{k}"] = v
    return out


def umask() -> int:
    """The process's umask (Python has no getter: it is set and restored at once). Files and folders
    moe-lora renames into place get ``0o666`` / ``0o777`` less it, like those ``open`` and ``mkdir``
    make, rather than the 0600 / 0700 of ``tempfile``."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(final: Path, tmp: Path | None = None, keep_existing: bool = False) -> Iterator[Path]:
    """A folder written in full or not at all (checkpoints, caches, the report, prepared datasets).

    Yields an empty temporary folder beside ``final`` (``tmp``: a fixed name, where several ranks
    must find it); when the block ends without error it takes ``final``'s place: an existing
    ``final`` is swapped out and removed, or with ``keep_existing`` kept (a concurrent writer of the
    same content came first). On an error the temporary folder goes and ``final`` is untouched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
        with contextlib.suppress(OSError):  # mkdtemp's 0700 would make it owner-only, unlike its neighbours
            tmp.chmod(0o777 & ~umask())
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        yield tmp
        _swap_in(tmp, final, keep_existing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, final: Path, keep_existing: bool) -> None:
    if not final.exists():
        try:
            os.replace(tmp, final)
            return
        except OSError:  # another writer's folder appeared meanwhile
            if not (keep_existing and final.exists()):
                raise
    if keep_existing:
        return
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------ run folders
class RunFolderError(ConfigError):
    """A run folder that moe-lora must not use: it holds files moe-lora did not write, or a live
    job holds its lock. Raised before anything in it is touched."""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _has_keys(value: Any, *keys: str) -> bool:
    return isinstance(value, dict) and all(k in value for k in keys)


def _moe_lora_config(path: Path) -> bool:
    """A ``config.yaml`` holding the top-level sections of moe-lora's config."""
    try:
        return _has_keys(yaml.safe_load(path.read_text()), "model", "adapter", "layout", "data", "recipe")
    except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError):
        return False


def _moe_lora_checkpoints(folder: Path) -> bool:
    """``checkpoints/`` with a ``step-<n>/checkpoint.json`` of moe-lora's shape, or holding only the
    ``.tmp-step-<n>`` folders of writes that never finished."""
    entries = list(folder.iterdir()) if folder.is_dir() else []
    if any(_has_keys(_json(p / "checkpoint.json"), "step", "config_hash") for p in entries):
        return True
    return bool(entries) and all(p.name.startswith(".tmp-step-") and p.is_dir() for p in entries)


def written_by_moe_lora(run_dir: Path) -> bool:
    """Whether moe-lora made ``run_dir``: its marker (:data:`RUN_MARKER`, JSON naming the
    ``moe_lora`` version) says so, or, for a folder written before the marker existed, it holds one
    of moe-lora's own files in moe-lora's shape: a ``results.json`` with ``adapter`` and ``metrics``,
    a ``checkpoints/step-<n>/checkpoint.json`` with ``step`` and ``config_hash`` (or a
    ``checkpoints/`` holding only ``.tmp-step-<n>`` folders), a ``failure.json`` with ``error`` and
    ``traceback``, or a ``config.yaml`` with the ``model``, ``adapter``, ``layout``, ``data`` and
    ``recipe`` sections. A ``config.yaml`` or ``metrics.jsonl`` alone proves nothing: other programs
    write files of those names."""
    return (
        _has_keys(_json(run_dir / RUN_MARKER), "moe_lora")
        or _has_keys(_json(run_dir / RESULTS), "adapter", "metrics")
        or _moe_lora_checkpoints(run_dir / CHECKPOINTS)
        or _has_keys(_json(run_dir / FAILURE), "error", "traceback")
        or _moe_lora_config(run_dir / CONFIG)
    )


def foreign_entries(run_dir: Path) -> list[str]:
    """The entries of ``run_dir`` that stop moe-lora from reusing it (to resume, skip or rerun a
    job); none when it may: the folder does not exist, holds only what Hydra makes before a job
    (:data:`HYDRA_FILES`) and moe-lora's marker and lock, or :func:`written_by_moe_lora`."""
    if not run_dir.is_dir():
        return []
    entries = sorted(set(os.listdir(run_dir)) - {*HYDRA_FILES, RUN_MARKER, RUN_LOCK})
    return [] if not entries or written_by_moe_lora(run_dir) else entries


def check_run_folder(run_dir: Path) -> None:
    """Refuse, touching nothing, a run folder holding files moe-lora did not write."""
    foreign = foreign_entries(run_dir)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunFolderError(
            f"run folder {run_dir} holds files moe-lora did not write ({shown}): it is left as it is; "
            "choose another hydra.run.dir"
        )


def write_run_marker(run_dir: Path) -> None:
    """Mark ``run_dir`` as moe-lora's (kept if already there): later runs may then reuse it."""
    path = run_dir / RUN_MARKER
    if _has_keys(_json(path), "moe_lora"):
        return

    try:
        ours = version("moe_lora")
    except PackageNotFoundError:
        ours = "unknown"
    # written in place: a cut marker only counts as none (the folder's own files still say whose it
    # is), where a temporary file left by a crash would be a foreign entry
    path.write_text(json.dumps({"moe_lora": ours, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


_HELD: dict[Path, int] = {}  # run folders whose lock this process holds -> the lock file's descriptor


def _holder(path: Path) -> str:
    """Who holds a lock, from what it wrote in the lock file."""
    info = _json(path)
    if not _has_keys(info, "pid", "host"):
        return "another process (its pid is not written yet)"
    return f"pid {info['pid']} on host {info['host']}" + (f" (since {info['since']})" if info.get("since") else "")


def _in_use(run_dir: Path) -> RunFolderError:
    return RunFolderError(
        f"run folder {run_dir} is in use by {_holder(run_dir / RUN_LOCK)}: a job running there holds "
        f"its lock {RUN_LOCK}; wait for it to end, or choose another hydra.run.dir"
    )


_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # a file system without flock (some Lustre mounts)


def _try_lock(fd: int, how: int, tries: int = 3) -> bool:
    """``flock`` without waiting on a live holder; a few short retries ride out another process's
    probe (:func:`check_not_live`). On a file system without locks the job goes on unguarded,
    with a warning (refusing every run there would be worse)."""
    for i in range(tries):
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno in _NO_LOCKS:
                logging.getLogger(__name__).warning(
                    "run folders on this file system cannot be locked (%s): two jobs in one folder go undetected",
                    exc.strerror,
                )
                return True
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if i + 1 < tries:
                time.sleep(0.1)
    return False


def _acquire(run_dir: Path) -> int:
    """The locked descriptor of ``run_dir``'s lock file. The lock file is removed when its holder
    ends cleanly, so a lock taken on a file that was meanwhile removed is dropped and taken again
    on the file now in its place; after a crash (SIGKILL) the kernel has released the lock and the
    file left behind, naming a dead pid, blocks nothing."""
    path = run_dir / RUN_LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RunFolderError(f"cannot lock run folder {run_dir}: {exc.strerror or exc} ({path})") from exc
        if not _try_lock(fd, fcntl.LOCK_EX):
            os.close(fd)
            raise _in_use(run_dir)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def run_folder(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for one job, from before its plan to its end, on every exit path
    (exceptions, ``sys.exit`` after a preemption): refused in one line, touching nothing, when it
    holds files moe-lora did not write or another job holds its lock; once held it gets moe-lora's
    marker. Only the process that plans the job holds it (rank 0, or the process that spawns
    ``recipe.nproc_per_node`` ranks): other ranks never take it, so they cannot wait on it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_folder(run_dir)
    fd = _acquire(run_dir)
    key = run_dir.resolve()
    _HELD[key] = fd
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            write_run_marker(run_dir)
        except OSError as exc:  # a full disk before the job starts: one line
            raise RunFolderError(f"cannot write to run folder {run_dir}: {exc.strerror or exc}") from exc
        yield
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            (run_dir / RUN_LOCK).unlink()  # while still held: a waiting opener then sees a new file
        os.close(fd)


def check_not_live(run_dir: Path) -> None:
    """Refuse, touching nothing, a run folder whose lock a live job holds (a probe: the lock is
    not kept; a folder whose lock this process holds passes)."""
    path = run_dir / RUN_LOCK
    if run_dir.resolve() in _HELD:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file: no job has the folder
        return
    try:
        if not _try_lock(fd, fcntl.LOCK_SH, tries=1):
            raise _in_use(run_dir)
    finally:
        os.close(fd)  # releases the probe's shared lock


# ------------------------------------------------------------------------------------ report folders
_REPORT_SUFFIXES = (".md", ".csv", ".tex", ".json", ".txt", ".png")


def _old_report(folder: Path) -> bool:
    """A report written before :data:`REPORT_MARKER` existed: ``index.md`` and only files of the
    kinds a report writes (tables, claims, plots), no folders."""
    entries = list(folder.iterdir())
    return (folder / "index.md").is_file() and all(p.is_file() and p.suffix in _REPORT_SUFFIXES for p in entries)


def _is_run(folder: Path) -> bool:
    """A folder any moe-lora run writes into (finished, failed, checkpointed or just begun)."""
    return any((folder / n).exists() for n in (RUN_MARKER, RUN_LOCK, RESULTS, FAILURE, CONFIG, METRICS, CHECKPOINTS))


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_report_folder(out: Path, reported: list[Path]) -> None:
    """Refuse, touching nothing, a report folder ``out`` whose replacement could lose anything: it
    must be new, empty, or a folder a report wrote before (its :data:`REPORT_MARKER`, or the files
    of a report made before the marker existed); it must neither be nor contain a folder being
    reported or any run folder, nor lie inside a run folder (``<run>/report``, the default when one
    run is reported, excepted). Inside a reported sweep it may lie (``<sweep>/report`` is the
    default): replacing a new or report folder there loses nothing."""
    target = out.resolve()
    for root in (p.resolve() for p in reported):
        if _within(root, target):
            raise ConfigError(
                f"report --out {out} is or contains {root}, which is being reported: choose another --out"
            )
    if target.is_dir() and _is_run(target):
        raise ConfigError(f"report --out {out} is a run folder: choose another --out")
    for parent in target.parents:  # moe-lora's own signs only: a project folder may hold a config.yaml
        if ((parent / RUN_LOCK).exists() or written_by_moe_lora(parent)) and target != parent / "report":
            raise ConfigError(f"report --out {out} lies inside the run folder {parent}: choose another --out")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"report --out {out} is a file, not a folder: choose another --out")
    if not any(out.iterdir()):
        return
    if not ((out / REPORT_MARKER).is_file() or _old_report(out)):
        raise ConfigError(
            f"report --out {out} holds files the report did not write: it is left as it is; choose a new or "
            "empty folder"
        )
    runs = [p for p in [target, *target.rglob("*")] if p.is_dir() and _is_run(p)]
    if runs:
        raise ConfigError(f"report --out {out} contains the run folder {runs[0]}: choose another --out")


def write_report_marker(folder: Path) -> None:
    (folder / REPORT_MARKER).write_text(json.dumps({"moe_lora_report": 1}) + "\n")
