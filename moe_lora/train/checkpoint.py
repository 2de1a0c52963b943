"""Checkpoints of one :class:`~moe_lora.train.loop.TrainState`: written whole or not at all, and
resumed bitwise.

``<run_dir>/checkpoints/step-<n>/`` holds the adapter tensors and buffers
(``adapter.safetensors``), the optimizer state keyed by parameter name (``optimizer.pt``, through
``torch.distributed.checkpoint.state_dict``, so FSDP shards are gathered), the rest of the loop's
state (``trainer.pt``: scheduler, GradScaler, data-order generator and position, the open loss
window, the routing recorder's open window, the byte lengths of ``metrics.jsonl`` and
``routing.jsonl``), one RNG file per rank (python, numpy, torch CPU, every CUDA device) and
``checkpoint.json`` (step, hash of the training-relevant config, size and SHA-256 of every file).
It is written to ``checkpoints/.tmp-step-<n>`` and renamed, so a crash or a full disk mid-write
leaves the previous checkpoint as it was; stale temporary folders are removed; the ``keep`` newest
are kept.

A checkpoint holds data, never code: the ``.pt`` files hold tensors and plain values only (the
numpy RNG state as a list) and are read with ``torch.load(weights_only=True)``; before a resume
starts, every file is checked against its size and SHA-256 and every pickle is scanned for the
callables it would import, so a damaged file or one carrying a payload is named in one line and
never run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import distribute_tensor

from moe_lora import outputs
from moe_lora.errors import ConfigError, OutputError, first_line
from moe_lora.outputs import atomic_dir
from moe_lora.tracking import write_text_atomic
from moe_lora.train.distributed import Dist, full_tensor

CHECKPOINTS = outputs.CHECKPOINTS
_STEP = re.compile(r"^step-(\d+)$")
# Keys that do not change what is trained: a resume may change them (thread count and device
# change float summation order, so bitwise equality then holds no more; the run still continues).
NOT_TRAINING = outputs.NOT_TRAINING


def sharded(model: nn.Module) -> bool:
    """Whether FSDP shards the model's parameters: gathering them is then a collective that every
    rank must join; otherwise only the rank that writes needs the (CPU) copy."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters plus adapter buffers (named ``adapter_*``, e.g. ALoRA's active mask);
    FSDP-sharded ones gathered whole (so every rank must call it)."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state |= {n: b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1].startswith("adapter_")}
    return {n: full_tensor(t.detach()).cpu().contiguous() for n, t in state.items()}


def set_adapter(model: nn.Module, state: dict[str, torch.Tensor], source: object) -> None:
    """Copy saved adapter tensors into the model (an FSDP shard takes its slice); ``source``
    names the file in the error when the tensors do not fit this config."""
    expected = set(adapter_state(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ConfigError(f"{source} does not fit this config (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name in state:
                _copy_into(t, state[name])


def load_adapter(model: nn.Module, path: Path) -> None:
    """A saved run's ``adapter_model.safetensors`` (``moe-lora eval``)."""
    set_adapter(model, load_file(str(path)), path)


# ------------------------------------------------------------------------------------ config
def training_config(resolved: dict) -> dict[str, Any]:
    """The flattened config without the keys in :data:`NOT_TRAINING`."""
    return {k: v for k, v in outputs.flatten(resolved).items() if outputs.changes_training(k)}


def config_hash(resolved: dict) -> str:
    return hashlib.sha256(json.dumps(training_config(resolved), sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(saved: dict, current: dict) -> list[str]:
    """Training-relevant keys whose values differ (or exist on one side only)."""
    a, b = training_config(saved), training_config(current)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))


# ------------------------------------------------------------------------------------ folders
def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed from their temporary folder), oldest first."""
    root = run_dir / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name))] if root.is_dir() else []
    return sorted(found)


def latest(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1][1] if found else None


def remove_stale(run_dir: Path) -> None:
    """Temporary folders of writes that never finished."""
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _rng_state() -> dict[str, Any]:
    """Plain values and tensors only (loadable with ``weights_only=True``): numpy's key array as a
    list of ints, python's state as nested tuples of ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(tuple(s["numpy"]))  # a list (this format) or an ndarray (older checkpoints)
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ------------------------------------------------------------------------------------ save / load
def save(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer: dict[str, Any],
    digest: str,
    keep: int,
    dist: Dist,
) -> Path:
    """Write ``checkpoints/step-<step>`` atomically (every rank calls it: FSDP gathers; each
    rank writes its RNG file); returns its path."""
    root = run_dir / CHECKPOINTS
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    adapter = optim = None
    if dist.is_main or sharded(model):  # FSDP: collectives every rank joins, before any file
        adapter, optim = adapter_state(model), _optimizer_state(model, optimizer)
    try:
        if dist.is_main:
            remove_stale(run_dir)
        # rank 0 owns the folder (a re-save of a step replaces it: the end of a resumed, finished run)
        with atomic_dir(final, tmp) if dist.is_main else contextlib.nullcontext(tmp):
            dist.barrier()
            _write(torch.save, _rng_state(), tmp / f"rng-rank{dist.rank}.pt")
            if dist.is_main:
                _write(save_file, adapter, tmp / "adapter.safetensors")
                _write(torch.save, optim, tmp / "optimizer.pt")
                _write(torch.save, trainer, tmp / "trainer.pt")
            dist.barrier()
            if dist.is_main:  # last: size and SHA-256 of every file, checked before a resume starts
                files = sorted(tmp.iterdir())
                meta = {
                    "step": step,
                    "config_hash": digest,
                    "ranks": dist.world_size,
                    "files": {p.name: p.stat().st_size for p in files},
                    "sha256": {p.name: sha256(p) for p in files},
                }
                (tmp / "checkpoint.json").write_text(json.dumps(meta) + "\n")
        if dist.is_main:
            for _, old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(
            f"cannot write checkpoint {final}: {exc.strerror or exc}{_free_space(root)} (free space, "
            f"or choose a writable hydra.run.dir); the previous checkpoint is intact"
        ) from exc
    dist.barrier()
    return final


OPTIMIZER_REMOVED = "removed after the run finished (recipe.keep_final_state=false)"


def drop_optimizer_state(path: Path) -> None:
    """Remove the optimizer state of a finished run's final checkpoint (``recipe.keep_final_state``
    false): most of a checkpoint's bytes, and never read again once results.json ends the run (a
    finished run is skipped, not resumed). ``checkpoint.json`` is rewritten first, without the file
    and saying so, so the folder stays moe-lora's and a resume from it is refused in one line."""
    meta = json.loads((path / "checkpoint.json").read_text())
    for key in ("files", "sha256"):
        meta.get(key, {}).pop("optimizer.pt", None)
    meta["optimizer_state"] = OPTIMIZER_REMOVED
    write_text_atomic(path / "checkpoint.json", json.dumps(meta) + "\n")
    (path / "optimizer.pt").unlink(missing_ok=True)


def _write(writer: Callable[[Any, Any], None], obj: Any, path: Path) -> None:
    """``torch.save`` / ``save_file`` whose failures are ``OSError`` s: torch reports a full disk as
    a ``RuntimeError`` ("unexpected pos ..."), safetensors as a ``SafetensorError``; a failure of
    the write itself, never of the state gathered before it."""
    try:
        writer(obj, str(path) if writer is save_file else path)
    except (RuntimeError, SafetensorError) as exc:
        raise OSError(f"{path.name}: {first_line(exc, 120)}") from exc


def _free_space(folder: Path) -> str:
    with contextlib.suppress(OSError):
        return f"; {shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    return ""


def sha256(path: Path) -> str:
    """The file's SHA-256 (a file just written is read back from the page cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# What a ``.pt`` file of a checkpoint may name besides torch's own data types: numpy's array
# reconstruction, for RNG files written before the numpy state was stored as a list. They build an
# array of a dtype and shape from bytes and call nothing the file chooses.
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct
SAFE_GLOBALS = [
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),  # numpy 2 builds the key array's dtype through its class
    (_reconstruct, "numpy._core.multiarray._reconstruct"),  # written by numpy 2
    (_reconstruct, "numpy.core.multiarray._reconstruct"),  # written by numpy 1
]


def _read(path: Path, what: str) -> Any:
    """One file of a checkpoint, as data only (``weights_only=True``: a pickle that names any
    other callable is refused before it runs); a missing or unreadable one is a one-line error."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors have no common base
        if code := _not_data(exc):
            raise ConfigError(_refused(path, code)) from None
        detail = first_line(exc, 120)
        raise ConfigError(
            f"checkpoint file {path} is unreadable ({detail}): the {what} cannot be restored; "
            f"delete {path.parent} to resume from the checkpoint before it"
        ) from None


def _not_data(exc: Exception) -> str:
    """The global a weights-only load refused ("posix.system"), else ''."""
    found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", str(exc))
    return found.group(1) if found else ""


def _refused(path: Path, names: str) -> str:
    return (
        f"checkpoint file {path} holds code, not only data (it would call {names}): refused, nothing "
        "in it ran (moe-lora's checkpoints hold tensors and plain values only)"
    )


def scan(path: Path) -> None:
    """Refuse a ``.pt`` file whose pickle names a callable beyond torch's data types and
    :data:`SAFE_GLOBALS` (a static scan of its ``data.pkl``: nothing is unpickled)."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # not a zip written by torch.save, a damaged archive
        raise ConfigError(
            f"checkpoint file {path} is unreadable ({first_line(exc, 120)}); delete {path.parent} to "
            "resume from the checkpoint before it"
        ) from None
    if unsafe:
        raise ConfigError(_refused(path, ", ".join(sorted(unsafe)[:3])))


def read_meta(path: Path) -> dict[str, Any]:
    """``checkpoint.json``, after checking that every file has the size and SHA-256 it was written
    with and that no ``.pt`` file carries code: a damaged, truncated or foreign file is named
    before anything starts. (Checkpoints written before SHA-256s were recorded are checked by
    size.)"""
    try:
        meta = json.loads((path / "checkpoint.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"checkpoint file {path / 'checkpoint.json'} is unreadable ({exc}); delete {path} to "
            "resume from the checkpoint before it"
        ) from None
    hashes = meta.get("sha256", {})
    for name, size in meta.get("files", {}).items():
        file = path / name
        actual = file.stat().st_size if file.exists() else None
        if actual != size:
            state = "missing" if actual is None else "truncated" if actual < size else "longer than written"
            raise ConfigError(
                f"checkpoint file {file} is {state} ({actual or 0} of {size} bytes); delete {path} to "
                "resume from the checkpoint before it"
            )
        if name in hashes and sha256(file) != hashes[name]:
            raise ConfigError(
                f"checkpoint file {file} is damaged (its SHA-256 differs from the one written with "
                f"it); delete {path} to resume from the checkpoint before it"
            )
        if file.suffix == ".pt":
            scan(file)
    return meta


def read_trainer(path: Path) -> dict[str, Any]:
    return _read(path / "trainer.pt", "trainer state")


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist) -> dict[str, Any]:
    """Restore adapter tensors, optimizer state and this rank's RNG; returns ``trainer.pt``."""
    set_adapter(model, _read(path / "adapter.safetensors", "adapter"), f"checkpoint {path}")
    optim = _read(path / "optimizer.pt", "optimizer state")
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
    rng = path / f"rng-rank{dist.rank}.pt"
    _set_rng_state(_read(rng if rng.exists() else path / "rng-rank0.pt", "random state"))
    return read_trainer(path)


def _copy_into(t: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter or buffer (an FSDP shard takes its own slice)."""
    if hasattr(t, "full_tensor"):  # DTensor: distribute the full value the way the shard is laid out
        value = distribute_tensor(value.to(t.device, t.dtype), t.device_mesh, t.placements)
        t.to_local().copy_(value.to_local())
    else:
        t.copy_(value.to(t.device, t.dtype))


# ------------------------------------------------------------------------------------ resume plan
@dataclass(frozen=True)
class Plan:
    """What a job does with its directory: ``new``, ``resume`` (from ``checkpoint``), ``skip`` (it
    finished with this config) or ``rerun`` (an earlier attempt failed before any checkpoint)."""

    action: str
    checkpoint: Path | None = None


def _saved_config_diff(run_dir: Path, resolved: dict) -> list[str] | None:
    """Training keys in which ``run_dir/config.yaml`` differs from ``resolved`` (None: no file)."""
    path = run_dir / outputs.CONFIG
    if not path.exists():
        return None
    return changed_keys(OmegaConf.to_container(OmegaConf.load(path)), resolved)


def resumable_meta(newest: Path, run_dir: Path) -> dict[str, Any]:
    """:func:`read_meta` of the checkpoint a resume would continue from; a finished run's final
    checkpoint whose optimizer state was removed (its results.json since deleted) is refused."""
    meta = read_meta(newest)
    if meta.get("optimizer_state") == OPTIMIZER_REMOVED:
        raise ConfigError(
            f"{newest} is the final checkpoint of a finished run, without its optimizer state "
            f"(recipe.keep_final_state=false), and {run_dir / outputs.RESULTS} is missing: nothing to "
            "resume; choose another hydra.run.dir"
        )
    return meta


def plan(run_dir: Path, resume: str | None, resolved: dict, sweep: bool) -> Plan:
    """Decide before anything is written; conflicts are one-line errors naming ``resume``. In a
    sweep, ``resume=auto`` is implied: rerunning a sweep into its folder skips finished jobs,
    resumes checkpointed ones and reruns failed ones. A folder is reused only when moe-lora made it
    (:func:`moe_lora.outputs.foreign_entries` says which folders, old ones without the marker
    included) and no live job holds its lock: otherwise a one-line error, and nothing is touched."""
    if resume not in (None, "auto") and Path(resume).resolve() != run_dir.resolve():
        raise ConfigError(
            f"resume={resume!r} but hydra.run.dir={str(run_dir)!r}: a run resumes in its own directory "
            f"(add hydra.run.dir={resume})"
        )
    outputs.check_run_folder(run_dir)
    if _launching_process():
        outputs.check_not_live(run_dir)
    auto = resume is not None or sweep
    newest = latest(run_dir) if run_dir.is_dir() else None
    if (run_dir / outputs.RESULTS).exists():
        if not auto:
            raise ConfigError(
                f"hydra.run.dir={str(run_dir)!r} already holds results.json of an earlier run; choose "
                "another hydra.run.dir"
            )
        diff = _saved_config_diff(run_dir, resolved)
        if diff:
            raise ConfigError(
                f"{run_dir} holds a finished run whose config differs in {', '.join(diff[:8])}; "
                "choose another directory"
            )
        return Plan("skip")
    if newest is not None:
        if not auto:
            raise ConfigError(
                f"hydra.run.dir={str(run_dir)!r} holds checkpoints ({newest.name}): continue it with "
                f"resume={run_dir} (or resume=auto), or choose another hydra.run.dir"
            )
        saved_hash = resumable_meta(newest, run_dir).get("config_hash")
        if saved_hash != config_hash(resolved):
            diff = _saved_config_diff(run_dir, resolved)
            if not diff:  # no config.yaml to name the keys, or one that matches while the hash does not
                why = "is missing" if diff is None else "matches this config: one of them was edited or copied"
                raise ConfigError(
                    f"resume: this config's hash {config_hash(resolved)} differs from {saved_hash!r} in "
                    f"{newest / 'checkpoint.json'}, and {run_dir / outputs.CONFIG} {why} (start a new run)"
                )
            raise ConfigError(
                f"resume: the config differs from the checkpointed run's in {', '.join(diff[:8])} "
                f"(resume with the run's own settings, or start a new run)"
            )
        return Plan("resume", newest)
    if resume not in (None, "auto"):
        raise ConfigError(
            f"resume={resume!r} has no checkpoint to continue from (no checkpoints/step-<n> in it); "
            "resume=auto continues where there is one and starts afresh where there is none"
        )
    if any((run_dir / n).exists() for n in (outputs.FAILURE, outputs.METRICS, outputs.CONFIG)):
        return Plan("rerun")
    return Plan("new")


def _launching_process() -> bool:
    """Not a torchrun rank other than 0: those check the config beside rank 0, which may already
    hold the run folder's lock (only the planning process takes it)."""
    return os.environ.get("RANK", "0") == "0"


RUN_FILES = outputs.RUN_FILES


def clear_failed_attempt(run_dir: Path) -> None:
    """The files of an attempt that failed before its first checkpoint (a rerun starts clean); in a
    folder moe-lora made only (checked again here: these names are common)."""
    outputs.check_run_folder(run_dir)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    remove_stale(run_dir)
