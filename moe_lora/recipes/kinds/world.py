"""The built-in world's two kinds (:mod:`moe_lora.world.mixture`): the default mix of world-knowledge
QA and instruction tasks, and the toy T0 (``data.mc_train_clusters``: multiple-choice clusters
trained and held out)."""

from __future__ import annotations

from moe_lora.data.kinds import DataKind, register_kind
from moe_lora.world.mixture import check_instruction_tasks, check_world_t0, world_mixture, world_t0_mixture

WORLD = register_kind(
    DataKind(
        "world",
        lambda cfg, env: world_mixture(cfg.data, env.world, cfg.seed),
        needs_world=True,
        check=check_instruction_tasks,
    )
)
WORLD_T0 = register_kind(
    DataKind(
        "world_t0",
        lambda cfg, env: world_t0_mixture(cfg.data, env.world, cfg.seed),
        matches=lambda data: bool(data.mc_train_clusters or data.mc_eval_clusters),
        key="data.mc_train_clusters",
        needs_world=True,
        check=check_world_t0,
    )
)
