"""The built-in world's data kinds (``world``, the default, and ``world_t0``): the fine-tuning
mixture and the evaluation sets, with a task type on every example, and their checks."""

from __future__ import annotations

import random
from dataclasses import replace

from moe_lora.config import DataConfig, TrainConfig
from moe_lora.data.example import EvalSet, Example, Mixture
from moe_lora.errors import ConfigError
from moe_lora.world.generator import INSTRUCTION_TASKS, MC_CLUSTERS, World, instruction_examples, mc_examples


def world_mixture(cfg: DataConfig, world: World, seed: int) -> Mixture:
    """``num_train`` examples: a ``cbqa_ratio`` share of QA pairs about the *trained* people, the
    rest instruction examples split evenly over the sub-tasks; shuffled by ``seed``.

    Evaluation sets are fixed by the world seed (identical across run seeds): CBQA about the
    held-out test people, and instruction prompts that never occur in the training set.
    """
    rng = random.Random(seed)
    n_cbqa = round(cfg.num_train * cfg.cbqa_ratio)
    n_instr = cfg.num_train - n_cbqa
    pool = world.qa("train")
    cbqa = [pool[i % len(pool)] for i in range(n_cbqa)]  # cycles through every trained fact
    instr, eval_instr, val_instr = instruction_split(cfg, n_instr)
    train = cbqa + instr
    rng.shuffle(train)
    validation = [e for pair in zip(world.qa("validation"), val_instr, strict=False) for e in pair]  # interleaved types
    test = [replace(e, id=f"cbqa-{i}") for i, e in enumerate(world.qa("test"))]
    eval_instr = [replace(e, id=f"instruction-{i}") for i, e in enumerate(eval_instr)]
    sets = {  # world answers are single words or symbol lists: nq_open's rules == exact for CBQA here
        "cbqa": EvalSet("cbqa", "cbqa", test, metric="teacher_forced", match="nq_open"),
        "instruction": EvalSet("instruction", "instruction", eval_instr, metric="teacher_forced", match="exact"),
    }
    return Mixture(
        train=train, eval=sets, validation=validation, info={"train": {"cbqa": n_cbqa, "instruction": n_instr}}
    )


def instruction_split(cfg: DataConfig, n_train: int) -> tuple[list[Example], list[Example], list[Example]]:
    """The world's instruction examples: ``n_train`` for training split evenly over
    ``data.instruction_tasks``, and ``eval_per_task`` per task for evaluation and again for
    validation, none of whose prompts is trained on. Fixed by the world seed (identical across run
    seeds); the real facts (``data.facts``) take their instruction side from here too."""
    tasks = list(cfg.instruction_tasks)
    items = (cfg.min_items, cfg.max_items)
    counts = [n_train // len(tasks) + (i < n_train % len(tasks)) for i in range(len(tasks))]
    train = [
        e
        for i, (t, n) in enumerate(zip(tasks, counts, strict=False))
        for e in instruction_examples([t], n, seed=cfg.world.seed + 1000 + i, items=items)
    ]
    seen = {e.prompt for e in train}
    held = [
        e
        for e in instruction_examples(tasks, cfg.eval_per_task * 3, seed=cfg.world.seed + 2000, items=items)
        if e.prompt not in seen
    ]
    evaluation = [e for t in tasks for e in [x for x in held if x.subtask == t][: cfg.eval_per_task]]
    validation = [
        e for t in tasks for e in [x for x in held if x.subtask == t][cfg.eval_per_task :][: cfg.eval_per_task]
    ]
    return train, evaluation, validation


def world_t0_mixture(cfg: DataConfig, world: World, seed: int) -> Mixture:
    """The toy T0: ``num_train`` multiple-choice examples of the tasks of ``data.mc_train_clusters``
    (knowledge tasks about the trained people), split evenly over tasks; one rank-classification set
    per task of ``data.mc_eval_clusters`` (knowledge tasks about the held-out test people), its
    ``eval_per_task`` examples spread over the three templates. Evaluation sets depend on the world
    seed only, as in :func:`world_mixture`."""
    rng = random.Random(seed)
    tasks = [(c, t) for c in cfg.mc_train_clusters for t in MC_CLUSTERS[c]]
    counts = [cfg.num_train // len(tasks) + (i < cfg.num_train % len(tasks)) for i in range(len(tasks))]
    train = [e for (c, t), n in zip(tasks, counts, strict=True) for e in mc_examples(world, t, c, n, "train", rng)]
    rng.shuffle(train)
    fixed = random.Random(cfg.world.seed + 3000)
    held = [(c, t) for c in cfg.mc_eval_clusters for t in MC_CLUSTERS[c]]
    sets = {
        t: EvalSet(
            t, "instruction", mc_examples(world, t, c, cfg.eval_per_task, "test", fixed), metric="rank_classification"
        )
        for c, t in held
    }
    validation = [e for c, t in tasks for e in mc_examples(world, t, c, 8, "validation", fixed)]
    by_type = {k: sum(e.task_type == k for e in train) for k in ("cbqa", "instruction")}
    return Mixture(train=train, eval=sets, validation=validation, info={"train": by_type})


# -------------------------------------------------------------------------------------- the kinds
def check_instruction_tasks(cfg: TrainConfig) -> None:
    """Every ``data.instruction_tasks`` entry is a task the world generates."""
    unknown = [t for t in cfg.data.instruction_tasks if t not in INSTRUCTION_TASKS]
    if unknown:
        raise ConfigError(
            f"data.instruction_tasks={list(cfg.data.instruction_tasks)} has unknown tasks {unknown} "
            f"(known: {', '.join(INSTRUCTION_TASKS)})"
        )


def check_world_t0(cfg: TrainConfig) -> None:
    """Known clusters, none both trained and held out."""
    for key in ("mc_train_clusters", "mc_eval_clusters"):
        unknown = [c for c in getattr(cfg.data, key) if c not in MC_CLUSTERS]
        if unknown:
            raise ConfigError(f"data.{key} has unknown clusters {unknown} (known: {', '.join(MC_CLUSTERS)})")
    both = sorted(set(cfg.data.mc_train_clusters) & set(cfg.data.mc_eval_clusters))
    if both:
        raise ConfigError(
            f"data.mc_eval_clusters: {both} are trained too (data.mc_train_clusters); held out means not trained"
        )
    if cfg.data.mc_eval_clusters and not cfg.data.mc_train_clusters:
        raise ConfigError(
            "data.mc_train_clusters is empty: the toy T0 trains on some clusters and holds out the others"
        )
