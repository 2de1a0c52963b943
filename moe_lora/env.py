"""Process environment, set before transformers is imported: offline unless the user says otherwise.

Downloads are off unless ``HF_HUB_OFFLINE=0`` / ``HF_DATASETS_OFFLINE=0`` are set; a run id shared
with launcher subprocesses names run directories (``${moe_lora.uid:}``). ``MOE_LORA_NUMERICS=portable``
pins the CPU kernels (ATen's AVX2 ones, MKL's COMPATIBLE branch, no dynamic thread counts) before
torch runs its first op, so that two x86 CPUs with AVX2 compute alike; with the same
``recipe.threads`` on both (docs/reproducibility.md). It costs about 2.4x the CPU time, hence opt-in.
"""

from __future__ import annotations

import os
import platform
import secrets
from pathlib import Path

# MOE_LORA_NUMERICS=portable: what every CPU is made to run, over what it would pick for itself
PORTABLE_NUMERICS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
}


def set_environment() -> None:
    set_numerics()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MOE_LORA_UID", secrets.token_hex(3))  # shared with launcher subprocesses


def set_numerics() -> None:
    """``MOE_LORA_NUMERICS``: ``native`` (the default: each CPU's fastest kernels) or ``portable``.
    Effective before torch's first op (ATen and MKL read these once); a typo stops in one line
    rather than leaving a run unpinned while its owner thinks it is pinned."""
    mode = os.environ.get("MOE_LORA_NUMERICS", "native")
    if mode == "portable":
        os.environ.update(PORTABLE_NUMERICS)
    elif mode != "native":
        raise SystemExit(f"moe-lora: error: MOE_LORA_NUMERICS={mode!r}: native (the default) or portable")


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("moe_lora.uid"):
        OmegaConf.register_new_resolver(
            "moe_lora.uid", lambda: os.environ.setdefault("MOE_LORA_UID", secrets.token_hex(3))
        )
    if not OmegaConf.has_resolver("moe_lora.mkdir"):
        # a folder that must exist before Hydra creates it (an Optuna study's sqlite file in the sweep folder)
        OmegaConf.register_new_resolver("moe_lora.mkdir", _mkdir)


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else what platform knows): step times and CPU
    numerics belong to it, so results that depend on them record it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
