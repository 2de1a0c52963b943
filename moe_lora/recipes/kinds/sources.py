"""Real datasets in their own schemas (``data.sources``: TriviaQA, NQ-open, Alpaca, ...), read from
local files by :mod:`moe_lora.data.sources`."""

from __future__ import annotations

from moe_lora.config import TrainConfig
from moe_lora.data.example import Mixture
from moe_lora.data.kinds import DataEnv, DataKind, ModelChecks, register_kind
from moe_lora.data.sources import check_max_length, check_real_data, check_sources, source_mixture


def check_model(cfg: TrainConfig, checks: ModelChecks) -> None:
    """Once the checkpoint's architecture is read: the model suits the data, and (when files are
    checked and something trains) no training prompt is cut by ``data.max_length``."""
    check_real_data(cfg, checks.trains)
    if checks.files and checks.trains:
        check_max_length(cfg, checks.tokenizer())


def build(cfg: TrainConfig, env: DataEnv) -> Mixture:
    return source_mixture(cfg.data, cfg.seed, num_fewshot=cfg.eval.num_fewshot, eval_limit=cfg.recipe.eval_limit)


SOURCES = register_kind(
    DataKind(
        "sources",
        build,
        matches=lambda data: bool(data.sources),
        key="data.sources",
        check_files=lambda cfg: check_sources(cfg.data),
        check_model=check_model,
    )
)
