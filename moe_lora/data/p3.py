"""P3 (bigscience/P3), the T0 mixture: one dataset config per (dataset, prompt template).

Layout under ``data.root`` (what ``scripts/prepare_data.py --p3`` writes, or any copy of P3's
configs): ``<root>/<config>/`` per config, a ``save_to_disk`` folder or ``<split>.jsonl`` /
``.parquet`` files, with P3's fields ``inputs_pretokenized``, ``targets_pretokenized`` and, for
classification templates, ``answer_choices``. ``*_score_eval`` twins (one row per (example,
choice), ``idx`` / ``is_correct``) are not needed: rank classification scores the choices itself.

A dataset is named by P3's config prefix (``ag_news``, ``imdb``, ``super_glue_rte``); its templates
are the configs under ``data.root`` that start with it (a config goes to the longest dataset name
it starts with). ANLI's rounds are datasets of their own: ``anli_r1`` takes the configs
``anli_<template>_r1``.

Training (T0's mixing): every training config is capped at ``data.p3.cap / templates`` rows (T0:
500,000 per dataset, split over its templates) and ``data.num_train`` examples are drawn from the
configs in proportion to their capped sizes. Evaluation: one set per held-out dataset, its
``eval_split`` rows of every template (``data.p3.eval_templates`` narrows them to the original-task
templates, which P3's files do not mark), scored by rank classification; examples carry their
template, so accuracy is reported per template and as the median over templates.

Task types: every P3 example is an ``instruction`` example; its task cluster (``data.p3.clusters``)
is kept as the example's ``subtask``. Deviation: routing statistics per cluster would need task
types beyond cbqa / instruction, which the recorder's groups do not have yet.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from moe_lora.config import DataConfig, P3Config, TrainConfig
from moe_lora.data.example import EvalSet, Example, Mixture
from moe_lora.data.sources import _load, _local_kind
from moe_lora.errors import ConfigError

FIELDS = ("inputs_pretokenized", "targets_pretokenized")
_ROUND = re.compile(r"^(?P<prefix>.+)_(?P<round>r\d+)$")  # anli_r1: configs anli_<template>_r1


def configs_under(root: str | None) -> list[str]:
    """P3 config folders under ``data.root`` (``*_score_eval`` twins left out)."""
    if not root or not Path(root).is_dir():
        return []
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.endswith("_score_eval"))


def _matches(dataset: str, config: str) -> bool:
    m = _ROUND.match(dataset)
    if m and dataset.startswith("anli"):
        return config.startswith(f"{m['prefix']}_") and config.endswith(f"_{m['round']}")
    return config.startswith(f"{dataset}_")


def templates_of(p3: P3Config, root: str | None) -> dict[str, dict[str, str]]:
    """dataset -> {template name: config} for every listed dataset; a config belongs to the longest
    listed dataset name it matches (so ``glue_mrpc`` and ``glue_mrpc_x`` never share one)."""
    names = list(dict.fromkeys([*p3.train_datasets, *p3.eval_datasets]))
    out: dict[str, dict[str, str]] = {n: {} for n in names}
    for config in configs_under(root):
        owners = [n for n in names if _matches(n, config)]
        if owners:
            owner = max(owners, key=len)
            out[owner][template_name(owner, config)] = config
    return out


def template_name(dataset: str, config: str) -> str:
    m = _ROUND.match(dataset)
    if m and dataset.startswith("anli"):
        return config[len(m["prefix"]) + 1 : -len(m["round"]) - 1]
    return config[len(dataset) + 1 :]


def check_p3(cfg: DataConfig) -> None:
    """Every listed dataset has templates under ``data.root``, every listed evaluation template
    exists, and a config's split carries P3's fields: one line naming the key, before training."""
    p3 = cfg.p3
    if not cfg.root or not Path(cfg.root).is_dir():
        raise ConfigError(f"data.root={cfg.root!r} is not a folder: P3's configs are read from it (data=p3_t0)")
    found = templates_of(p3, cfg.root)
    for key, names in (("data.p3.train_datasets", p3.train_datasets), ("data.p3.eval_datasets", p3.eval_datasets)):
        for name in names:
            if not found[name]:
                raise ConfigError(
                    f"{key}: {name!r} has no template under data.root={cfg.root} (no folder named {name}_<template>; "
                    "scripts/prepare_data.py --p3 fetches them)"
                )
    for name, wanted in p3.eval_templates.items():
        missing = sorted(set(wanted) - set(found.get(name, {})))
        if missing:
            raise ConfigError(
                f"data.p3.eval_templates.{name}: {missing} not under data.root (its templates: "
                f"{sorted(found.get(name, {}))})"
            )
    for name in [*p3.train_datasets[:1], *p3.eval_datasets[:1]]:
        config = next(iter(found[name].values()))
        split = p3.train_split if name in p3.train_datasets else p3.eval_split
        _split(cfg.root, config, split)


def _split(root: str, config: str, split: str) -> Any:
    path = Path(root) / config
    kind = _local_kind(path)
    if kind is None:
        raise ConfigError(f"data.root: {path} holds neither a save_to_disk dataset nor data files")
    splits = _load(kind, str(path), None)
    if split not in splits:
        raise ConfigError(f"data.p3: {path} has no split {split!r} (splits: {', '.join(splits)})")
    ds = splits[split]
    missing = [f for f in FIELDS if f not in ds.column_names]
    if missing:
        raise ConfigError(f"data.p3: {path} ({split}) lacks P3's fields {missing} (columns: {ds.column_names})")
    return ds


def _example(row: dict, dataset: str, template: str, cluster: str, i: int, with_choices: bool) -> Example:
    choices = tuple(c.strip() for c in row.get("answer_choices") or ()) if with_choices else ()
    return Example(
        prompt=row["inputs_pretokenized"].strip(),
        answer=row["targets_pretokenized"].strip(),
        task_type="instruction",
        subtask=cluster or dataset,
        id=f"{dataset}/{template}/{i}",
        choices=choices,
        template=template,
    )


def capped_sizes(sizes: dict[str, int], templates: int, cap: int) -> dict[str, int]:
    """T0's cap: a dataset's ``cap`` examples split evenly over its templates."""
    per = max(1, cap // max(templates, 1))
    return {c: min(n, per) for c, n in sizes.items()}


def allocate(weights: dict[str, int], total: int) -> dict[str, int]:
    """``total`` split in proportion to ``weights`` (largest remainder), never above a weight."""
    mass = sum(weights.values())
    if mass == 0:
        return dict.fromkeys(weights, 0)
    total = min(total, mass)
    exact = {k: total * w / mass for k, w in weights.items()}
    out = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: out[k] - exact[k])[: total - sum(out.values())]:
        out[k] += 1
    return out


def p3_mixture(cfg: DataConfig, seed: int, eval_limit: int | None = None) -> Mixture:
    """The T0 training mixture and held-out rank-classification sets (module docstring)."""
    p3, rng = cfg.p3, random.Random(seed)
    found = templates_of(p3, cfg.root)
    splits = {(n, t): _split(cfg.root, c, p3.train_split) for n in p3.train_datasets for t, c in found[n].items()}
    capped: dict[tuple[str, str], int] = {}
    for name in p3.train_datasets:
        sizes = {t: len(splits[(name, t)]) for t in found[name]}
        capped |= {(name, t): n for t, n in capped_sizes(sizes, len(sizes), p3.cap).items()}
    counts = allocate(capped, cfg.num_train)
    train, validation = [], []
    for (name, template), count in counts.items():
        ds = splits[(name, template)]
        rows = rng.sample(range(capped[(name, template)]), count)
        cluster = p3.clusters.get(name, "")
        train += [_example(ds[i], name, template, cluster, i, False) for i in rows]
        held = [i for i in range(capped[(name, template)], min(len(ds), capped[(name, template)] + 2))]
        validation += [_example(ds[i], name, template, cluster, i, False) for i in held]
    rng.shuffle(train)
    limit = p3.eval_examples if eval_limit is None else min(eval_limit, p3.eval_examples or eval_limit)
    evals = {name: _eval_set(cfg, name, found[name], limit) for name in p3.eval_datasets}
    return Mixture(
        train=train,
        eval=evals,
        validation=validation or train[:32],
        info={"train": {"cbqa": 0, "instruction": len(train)}, "p3": {f"{n}/{t}": c for (n, t), c in counts.items()}},
    )


def _eval_set(cfg: DataConfig, name: str, templates: dict[str, str], limit: int | None) -> EvalSet:
    """One held-out dataset: ``limit`` rows of each (wanted) template, scored by rank classification."""
    wanted = cfg.p3.eval_templates.get(name) or list(templates)
    examples = []
    for template in wanted:
        ds = _split(cfg.root, templates[template], cfg.p3.eval_split)
        n = len(ds) if limit is None else min(limit, len(ds))
        for i in range(n):
            ex = _example(ds[i], name, template, cfg.p3.clusters.get(name, ""), i, True)
            if len(ex.choices) < 2 or ex.answer not in ex.choices:
                raise ConfigError(
                    f"data.p3.eval_datasets: {templates[template]} row {i} has no answer_choices holding its "
                    "target: rank classification needs them (evaluate classification templates only)"
                )
            examples.append(ex)
    return EvalSet(name, "instruction", examples, metric="rank_classification")


# --------------------------------------------------------------------------------------- the kind
def check_p3_model(cfg: TrainConfig) -> None:
    """P3 needs a real tokenizer."""
    if cfg.model.source == "world":
        raise ConfigError(
            f"data={cfg.data.name!r} reads P3 (data.p3) but model.source=world: the built-in model's "
            "vocabulary only covers the built-in world; choose a hub model (model=... model.name_or_path=...)"
        )
