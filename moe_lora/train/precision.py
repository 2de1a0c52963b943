"""Device and mixed precision: where the model runs and in which dtype its matmuls compute.

``model.dtype`` is how the frozen base weights are stored; ``recipe.precision`` is how the forward
computes (``auto`` follows ``model.dtype``): ``bf16`` and ``fp16`` run the forward under
``torch.autocast`` (fp16 adds a ``GradScaler``, as HF Trainer and Lightning do), ``fp32`` runs no
autocast (ops in the dtype of their inputs). Adapters, routers, their buffers and so the optimizer
state stay in ``adapter.dtype`` (float32 by default) whatever the base dtype: pure-bf16 AdamW
rounds small updates away. Every pair trains on a CPU too (CPU autocast does bf16 and fp16).
"""

from __future__ import annotations

import contextlib
import resource
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from moe_lora.errors import ConfigError

_PRECISION_OF_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """``recipe.device`` -> a device that exists here; one-line ``ConfigError`` otherwise."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"recipe.device={spec!r} is not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"recipe.device={spec!r} but this machine has no CUDA device (use recipe.device=auto or cpu)"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"recipe.device={spec!r} but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
            )
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"recipe.device={spec!r} but MPS is not available on this machine")
    elif device.type != "cpu":
        raise ConfigError(f"recipe.device={spec!r} is not supported (use auto, cpu, cuda, cuda:N or mps)")
    return device


def resolve_precision(precision: str, model_dtype: str) -> str:
    """``auto`` follows the stored base dtype: bfloat16 -> bf16, float16 -> fp16, float32 -> fp32."""
    return _PRECISION_OF_DTYPE[model_dtype] if precision == "auto" else precision


def check_precision(precision: str, model_dtype: str, adapter_dtype: str, trains_base: bool) -> None:
    """Combinations that cannot train, named before anything is built."""
    mode = resolve_precision(precision, model_dtype)
    if mode == "fp16" and adapter_dtype == "float16":
        raise ConfigError(
            "adapter.dtype=float16 with recipe.precision=fp16: the GradScaler needs float32 trainable "
            "weights (set adapter.dtype=float32)"
        )
    if mode == "fp16" and trains_base and model_dtype == "float16" and adapter_dtype != "float32":
        raise ConfigError(
            "full fine-tuning with recipe.precision=fp16 needs float32 master weights (adapter.dtype=float32)"
        )


@dataclass(frozen=True)
class Precision:
    """The compute settings of one run: device, autocast dtype (None: no autocast), loss scaling."""

    device: torch.device
    mode: str  # fp32 | bf16 | fp16

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST_DTYPE.get(self.mode)

    def autocast(self) -> AbstractContextManager:
        """The forward's context: ``torch.autocast`` for bf16/fp16, nothing for fp32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Dynamic loss scaling for fp16 (a disabled scaler, a pass-through, otherwise)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.mode == "fp16")


def make_precision(device: str, precision: str, model_dtype: str) -> Precision:
    return Precision(resolve_device(device), resolve_precision(precision, model_dtype))


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak since the last reset; elsewhere the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (timing only at logging steps)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
