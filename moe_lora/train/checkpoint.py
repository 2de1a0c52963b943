"""Checkpoints of one :class:`~moe_lora.train.loop.TrainState`: written whole or not at all, and
resumed bitwise.

``<run_dir>/checkpoints/step-<n>/`` holds the adapter tensors and buffers
(``adapter.safetensors``), the optimizer state keyed by parameter name (``optimizer.pt``, through
``torch.distributed.checkpoint.state_dict``, so FSDP shards are gathered), the rest of the loop's
state (``trainer.pt``: scheduler, GradScaler, data-order generator and position, the open loss
window, the routing recorder's open window, the byte lengths of ``metrics.jsonl`` and
``routing.jsonl``), one RNG file per rank (python, numpy, torch CPU, every CUDA device) and
``checkpoint.json`` (step, hash of the training-relevant config). It is written to
``checkpoints/.tmp-step-<n>`` and renamed, so a crash mid-write leaves the previous checkpoint as
it was; stale temporary folders are removed; the ``keep`` newest are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moe_lora import outputs
from moe_lora.errors import ConfigError, OutputError, first_line
from moe_lora.outputs import atomic_dir
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
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
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
            torch.save(_rng_state(), tmp / f"rng-rank{dist.rank}.pt")
            if dist.is_main:
                save_file(adapter, str(tmp / "adapter.safetensors"))
                torch.save(optim, tmp / "optimizer.pt")
                torch.save(trainer, tmp / "trainer.pt")
            dist.barrier()
            if dist.is_main:  # last: the sizes of every file, checked before a resume starts
                files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
                (tmp / "checkpoint.json").write_text(
                    json.dumps({"step": step, "config_hash": digest, "ranks": dist.world_size, "files": files}) + "\n"
                )
        if dist.is_main:
            for _, old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(
            f"cannot write checkpoint {final}: {exc.strerror or exc} (free space, or choose a "
            f"writable hydra.run.dir); the previous checkpoint is intact"
        ) from exc
    dist.barrier()
    return final


def _read(path: Path, what: str) -> Any:
    """One file of a checkpoint; a missing or unreadable one is a one-line error naming it."""
    try:
        return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=False)
    except Exception as exc:  # safetensors, pickle and zip errors have no common base
        detail = first_line(exc, 120)
        raise ConfigError(
            f"checkpoint file {path} is unreadable ({detail}): the {what} cannot be restored; "
            f"delete {path.parent} to resume from the checkpoint before it"
        ) from None


def read_meta(path: Path) -> dict[str, Any]:
    """``checkpoint.json``, after checking that every file has the size it was written with (a
    truncated or missing file is named before anything starts)."""
    try:
        meta = json.loads((path / "checkpoint.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"checkpoint file {path / 'checkpoint.json'} is unreadable ({exc}); delete {path} to "
            "resume from the checkpoint before it"
        ) from None
    for name, size in meta.get("files", {}).items():
        actual = (path / name).stat().st_size if (path / name).exists() else None
        if actual != size:
            raise ConfigError(
                f"checkpoint file {path / name} is {'missing' if actual is None else 'truncated'} "
                f"({actual or 0} of {size} bytes); delete {path} to resume from the checkpoint before it"
            )
    return meta


def read_trainer(path: Path) -> dict[str, Any]:
    return _read(path / "trainer.pt", "trainer state")


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist) -> dict[str, Any]:
    """Restore adapter tensors, optimizer state and this rank's RNG; returns ``trainer.pt``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_adapter(model, _read(path / "adapter.safetensors", "adapter"), f"checkpoint {path}")
    optim = _read(path / "optimizer.pt", "optimizer state")
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
    rng = path / f"rng-rank{dist.rank}.pt"
    _set_rng_state(_read(rng if rng.exists() else path / "rng-rank0.pt", "random state"))
    return read_trainer(path)


def _copy_into(t: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter or buffer (an FSDP shard takes its own slice)."""
    if hasattr(t, "full_tensor"):  # DTensor: distribute the full value the way the shard is laid out
        from torch.distributed.tensor import distribute_tensor

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
    from omegaconf import OmegaConf

    path = run_dir / outputs.CONFIG
    if not path.exists():
        return None
    return changed_keys(OmegaConf.to_container(OmegaConf.load(path)), resolved)


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
        saved_hash = read_meta(newest).get("config_hash")
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
        raise ConfigError(f"resume={resume!r} has no checkpoint to continue from (no checkpoints/step-<n> in it)")
    if any((run_dir / n).exists() for n in (outputs.FAILURE, outputs.METRICS, outputs.CONFIG)):
        return Plan("rerun")
    return Plan("new")


def _launching_process() -> bool:
    """Not a torchrun rank other than 0: those check the config beside rank 0, which may already
    hold the run folder's lock (only the planning process takes it)."""
    import os

    return os.environ.get("RANK", "0") == "0"


RUN_FILES = outputs.RUN_FILES


def clear_failed_attempt(run_dir: Path) -> None:
    """The files of an attempt that failed before its first checkpoint (a rerun starts clean); in a
    folder moe-lora made only (checked again here: these names are common)."""
    outputs.check_run_folder(run_dir)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    remove_stale(run_dir)
