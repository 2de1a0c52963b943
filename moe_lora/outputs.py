"""The outputs room: the name of every file a run writes, and the plain helpers shared by the code
that writes them (training) and the code that reads them (the report).

Nothing here imports training code, so the report can use it and still read result files only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    "recipe.threads",
    "recipe.device",
    "recipe.eval_limit",
    "recipe.on_nonfinite",
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
