"""Process environment, set before transformers is imported: offline unless the user says otherwise.

Downloads are off unless ``HF_HUB_OFFLINE=0`` / ``HF_DATASETS_OFFLINE=0`` are set; a run id shared
with launcher subprocesses names run directories (``${moe_lora.uid:}``).
"""

from __future__ import annotations

import os
import secrets


def set_environment() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MOE_LORA_UID", secrets.token_hex(3))  # shared with launcher subprocesses


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
