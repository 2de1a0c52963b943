"""The real-facts data kind (``data.facts``): calibrate the base model, then build the mix.

Facts and their split live in :mod:`moe_lora.data.facts`, the calibration in
:mod:`moe_lora.eval.calibrate`, the instruction side in :mod:`moe_lora.world.mixture`; the kind is
registered here, above all three, because its split needs the base model's answers.
"""

from __future__ import annotations

from pathlib import Path

from moe_lora.config import TrainConfig
from moe_lora.data.example import Mixture
from moe_lora.data.facts import MATCH, STOP, calibration_set, check_facts, fact_of, facts_mixture
from moe_lora.data.kinds import DataEnv, DataKind, register_kind
from moe_lora.errors import ConfigError
from moe_lora.eval.calibrate import calibrate
from moe_lora.world.mixture import instruction_split


def real_facts_mixture(cfg: TrainConfig, env: DataEnv) -> Mixture:
    """The mix of :func:`moe_lora.data.facts.facts_mixture`, its held-out facts split into known and
    unknown by the base model's answers to their calibration questions (cached in ``cache_dir``)."""
    records, path = calibrate(
        env.model,
        env.tokenizer,
        calibration_set(cfg.data.facts),
        cache_dir=Path(cfg.cache_dir) / "facts",
        name="facts",
        match=MATCH,
        stop=STOP,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        chat_template=bool(cfg.data.chat_template),
        autocast=env.precision.autocast,
        progress=env.progress,
    )
    known = {fact_of(i): r["known"] for i, r in records.items()}
    n_instruction = cfg.data.num_train - round(cfg.data.num_train * cfg.data.cbqa_ratio)
    mixture = facts_mixture(cfg.data, known, instruction_split(cfg.data, n_instruction), cfg.seed)
    mixture.info["facts"]["calibration_file"] = str(path)
    return mixture


def check_real_model(cfg: TrainConfig) -> None:
    """The built-in model's word-level vocabulary has no countries or elements."""
    if cfg.model.source == "world":
        raise ConfigError(
            f"data={cfg.data.name!r} asks real facts (data.facts) but model.source=world: the built-in "
            "model's vocabulary only covers the built-in world; choose a real model (model=smollm2_135m)"
        )


FACTS = register_kind(
    DataKind(
        "facts",
        real_facts_mixture,
        matches=lambda data: data.facts.enabled,
        key="data.facts",
        check=check_real_model,
        check_files=lambda cfg: check_facts(cfg.data.facts),
    )
)
