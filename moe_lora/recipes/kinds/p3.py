"""P3 (``data.p3``): the T0 mixture from P3's files under ``data.root`` (:mod:`moe_lora.data.p3`)."""

from __future__ import annotations

from moe_lora.config import TrainConfig
from moe_lora.data.example import Mixture
from moe_lora.data.kinds import DataEnv, DataKind, register_kind
from moe_lora.data.p3 import check_p3, check_p3_model, p3_mixture


def build(cfg: TrainConfig, env: DataEnv) -> Mixture:
    return p3_mixture(cfg.data, cfg.seed, eval_limit=cfg.recipe.eval_limit)


P3 = register_kind(
    DataKind(
        "p3",
        build,
        matches=lambda data: data.p3.enabled,
        key="data.p3",
        check=check_p3_model,
        check_files=lambda cfg: check_p3(cfg.data),
    )
)
