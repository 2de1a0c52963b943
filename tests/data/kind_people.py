"""A data kind in one file, for tests/data/test_kinds.py: questions about the world's people only.

Importing this module registers the kind; a config asks for it by ``data.name=people_qa``. It
trains on CBQA pairs about the trained people and scores CBQA about the held-out ones, so it needs
the built-in world (its vocabulary covers the questions).
"""

from __future__ import annotations

from dataclasses import replace

from moe_lora.config import DataConfig, TrainConfig
from moe_lora.data.example import EvalSet, Mixture
from moe_lora.data.kinds import DataEnv, DataKind, register_kind
from moe_lora.errors import ConfigError

NAME = "people_qa"


def check(cfg: TrainConfig) -> None:
    """The mix is questions only: a ``cbqa_ratio`` below 1 would promise instructions it never has."""
    if cfg.data.cbqa_ratio != 1.0:
        raise ConfigError(f"data.cbqa_ratio={cfg.data.cbqa_ratio}: data={NAME} trains on questions only; set it to 1.0")


def build(cfg: TrainConfig, env: DataEnv) -> Mixture:
    pool = env.world.qa("train")
    train = [pool[i % len(pool)] for i in range(cfg.data.num_train)]
    test = [replace(e, id=f"people-{i}") for i, e in enumerate(env.world.qa("test"))]
    sets = {"people": EvalSet("people", "cbqa", test, metric="teacher_forced", match="nq_open")}
    info = {"kind": NAME, "train": {"cbqa": len(train), "instruction": 0}}
    return Mixture(train=train, eval=sets, validation=env.world.qa("validation"), info=info)


def asks(data: DataConfig) -> bool:
    return data.name == NAME


PEOPLE_QA = register_kind(DataKind(NAME, build, matches=asks, key=f"data.name={NAME}", needs_world=True, check=check))
