"""Real datasets through ``datasets``: resolution, field mappings, sampling, evaluation sets.

A source is looked up in a fixed order so that offline clusters work: ``<data.root>/<name>`` (what
``scripts/prepare_data.py`` writes), then ``path`` as a local folder / file / glob, then ``path`` as a
hub id in the local ``datasets`` cache (a download only with ``HF_DATASETS_OFFLINE=0``). Every
failure is a one-line :class:`ConfigError` naming ``data.sources.<name>.<key>``, raised by
:func:`check_sources` from ``validate()`` before any model is built.

Roles (``fields`` maps them to columns; an unmapped role defaults to the column of the same name):
CBQA ``question``, ``answers`` (a string or a list; the first is the training target),
``aliases`` (optional: accepted answers for matching, default ``answers``); instruction
``output`` (the response) plus whatever the template reads (``instruction``, ``input``,
``question``); any source ``id`` (optional; default ``<name>-<row index>``).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

from moe_lora.config import DataConfig, SourceConfig, TrainConfig
from moe_lora.data.collate import encode_example
from moe_lora.data.example import EvalSet, Example, Mixture
from moe_lora.data.templates import Template, fewshot_prompt, get_template
from moe_lora.errors import ConfigError, first_line

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
OPTIONAL_ROLES = ("aliases", "id", "input")
VALIDATION_PER_SOURCE = 32  # tail rows of each train split kept out of training (ALoRA's scoring batch)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ resolution
@dataclass(frozen=True)
class ResolvedSource:
    """Where a source was found: ``kind`` is ``disk`` (save_to_disk), ``files`` (json/jsonl/parquet/csv
    file, glob or folder) or ``hub`` (the local ``datasets`` cache, or a download when allowed)."""

    name: str
    kind: str
    location: str
    config: str | None = None

    def load(self) -> Any:
        """All splits as a ``DatasetDict`` (memory-mapped; loaded once per process). A local file or
        folder ``datasets`` cannot read (empty, zero rows, corrupt) is a one-line error naming it."""
        if self.kind == "hub":
            return _load(self.kind, self.location, self.config)  # resolve_source words its failures
        if self.kind == "files" and Path(self.location).is_file() and Path(self.location).stat().st_size == 0:
            raise ConfigError(f"data.sources.{self.name}: {self.location} is empty")
        try:
            return _load(self.kind, self.location, self.config)
        except Exception as exc:  # datasets raises StopIteration, IndexError, ArrowInvalid, ...
            detail = first_line(_root_cause(exc), 160)
            raise ConfigError(
                f"data.sources.{self.name}: {self.location} cannot be read as a dataset ({detail})"
            ) from None


def _root_cause(exc: BaseException) -> BaseException:
    """The parser's own error under datasets' "An error occurred while generating the dataset"."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars for loads that take milliseconds (they would swamp the one-line errors), and
    none of datasets' log lines: a file it cannot read is logged at ERROR (with its absolute path)
    before the exception that :meth:`ResolvedSource.load` turns into the one-line error."""
    import datasets
    from datasets.utils import logging as ds_logging

    was_on = not datasets.are_progress_bars_disabled()
    level = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if was_on:
            datasets.enable_progress_bars()


@functools.lru_cache(maxsize=32)
def _load(kind: str, location: str, config: str | None) -> Any:
    import datasets

    with quiet():
        if kind == "disk":
            loaded = datasets.load_from_disk(location)
        elif kind == "files" and Path(location).is_dir():
            loaded = datasets.load_dataset(location)
        elif kind == "files":
            loaded = datasets.load_dataset(BUILDERS[Path(location).suffix], data_files=location)
        else:
            loaded = datasets.load_dataset(location, config)
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def _local_kind(path: Path) -> str | None:
    """``disk`` for a save_to_disk folder, ``files`` for data files or a folder of them."""
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "disk"
        return "files" if any(p.suffix in BUILDERS for p in path.rglob("*") if p.is_file()) else None
    if path.is_file():
        return "files" if path.suffix in BUILDERS else None
    matches = glob.glob(str(path))
    return "files" if matches and all(Path(m).suffix in BUILDERS for m in matches) else None


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return (
        len(parts) <= 2
        and all(parts)
        and not path.startswith((".", "~"))
        and not any(c in path for c in "*?[")
        and Path(path).suffix not in BUILDERS
    )


def _offline() -> bool:
    flag = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE") or "0"
    return flag.upper() in ("1", "ON", "YES", "TRUE")


def _maybe_cached(path: str) -> bool:
    """Whether a hub dataset can be in a local cache: its folder in the ``datasets`` cache
    (``org___name``) or in the hub cache (``datasets--org--name``). A cheap necessary condition:
    where either exists, ``datasets`` itself decides."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")).expanduser()
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", os.environ.get("HUGGINGFACE_HUB_CACHE", home / "hub"))).expanduser()
    return (datasets_cache / path.replace("/", "___")).exists() or (
        hub_cache / f"datasets--{path.replace('/', '--')}"
    ).exists()


def resolve_source(name: str, src: SourceConfig, root: str | None) -> ResolvedSource:
    """``<root>/<name>``, then ``src.path`` on disk, then ``src.path`` in the ``datasets`` cache."""
    key = f"data.sources.{name}"
    if root is not None and (Path(root) / name).exists():
        where = Path(root) / name
        kind = _local_kind(where)
        if kind is None:
            raise ConfigError(
                f"data.root={root!r}: {where} holds neither a save_to_disk dataset nor "
                f"json/jsonl/parquet/csv files (source {key})"
            )
        return ResolvedSource(name, kind, str(where))
    local = Path(src.path).expanduser()
    kind = _local_kind(local)
    if kind is not None:
        return ResolvedSource(name, kind, str(local))
    looked = f"not under data.root={root!r} ({Path(root) / name})" if root else "data.root is unset"
    looked += ", not a local file or folder"
    if not _looks_like_hub_id(src.path):
        raise ConfigError(f"{key}.path={src.path!r} not found: {looked}")
    if _offline() and not _maybe_cached(src.path):  # fails in milliseconds, without importing datasets
        raise ConfigError(
            f"{key}.path={src.path!r} not found: {looked}, not in the local datasets cache; run "
            "scripts/prepare_data.py or set HF_DATASETS_OFFLINE=0"
        )
    hub = ResolvedSource(name, "hub", src.path, src.config)
    try:
        hub.load()
    except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ...
        import datasets

        detail = first_line(exc, 160)
        if isinstance(exc, ValueError) and "config" in detail.lower():
            raise ConfigError(f"{key}.config={src.config!r} is not a config of {src.path!r} ({detail})") from None
        how = (
            "not in the local datasets cache; run scripts/prepare_data.py or set HF_DATASETS_OFFLINE=0"
            if datasets.config.HF_HUB_OFFLINE
            else f"and could not be loaded from the hub ({detail})"
        )
        raise ConfigError(f"{key}.path={src.path!r} not found: {looked}, {how}") from None
    return hub


# -------------------------------------------------------------------------------------- splits, fields
def select_split(splits: Any, spec: str, key: str) -> Any:
    """A split spec as ``datasets`` writes it (``train``, ``train[:95%]``, ``train[-200:]``,
    ``train+validation``) applied to loaded splits; a missing split names the key."""
    from datasets import ReadInstruction, concatenate_datasets

    try:
        instruction = ReadInstruction.from_spec(spec)
    except (ValueError, AssertionError) as exc:
        raise ConfigError(f"{key}={spec!r} is not a split spec ({exc})") from None
    sizes = {n: len(d) for n, d in splits.items()}
    try:
        parts = instruction.to_absolute(sizes)
    except (ValueError, KeyError, AssertionError):
        raise ConfigError(f"{key}={spec!r} is not a split of this dataset (splits: {', '.join(sizes)})") from None
    if all(p.from_ >= p.to for p in parts):  # datasets' select raises IndexError on an empty range
        rows = ", ".join(f"{n}: {k}" for n, k in sizes.items())
        raise ConfigError(f"{key}={spec!r} selects no rows of this dataset (rows per split: {rows})")
    picked = [
        splits[p.splitname].select(range(p.from_, p.to))
        if (p.from_, p.to) != (0, sizes[p.splitname])
        else splits[p.splitname]
        for p in parts
    ]
    return picked[0] if len(picked) == 1 else concatenate_datasets(picked)


def column_paths(features: Any, prefix: str = "") -> list[str]:
    """Every column, nested struct fields as dotted paths (``answer``, ``answer.aliases``, ...)."""
    out = []
    for col, feat in features.items():
        out.append(prefix + col)
        inner = getattr(feat, "feature", feat)  # a list of structs exposes its struct's fields too
        if isinstance(inner, dict):
            out += column_paths(inner, f"{prefix}{col}.")
    return out


def mapping(name: str, src: SourceConfig, columns: list[str]) -> dict[str, str]:
    """Role -> column: ``fields``, plus same-named columns for roles the source needs or may use."""
    template = get_template(src.template, f"data.sources.{name}.template")
    required = {"question", "answers"} if src.task_type == "cbqa" else {"output"}
    required |= template.required
    out = {r: r for r in (required | set(OPTIONAL_ROLES) | template.roles) if r in columns}
    out |= dict(src.fields)
    missing = sorted(r for r in required if r not in out)
    if missing:
        raise ConfigError(
            f"data.sources.{name}.fields has no {missing[0]!r} (task_type={src.task_type}, "
            f"template={src.template!r}; columns: {', '.join(columns)})"
        )
    return out


def check_fields(name: str, roles: dict[str, str], columns: list[str], where: str) -> None:
    for role, col in roles.items():
        if col not in columns:
            raise ConfigError(
                f"data.sources.{name}.fields.{role}={col} is not a column of {where} (columns: {', '.join(columns)})"
            )


def open_split(name: str, src: SourceConfig, resolved: ResolvedSource, which: str) -> tuple[Any, dict[str, str]]:
    """One split of a source (``which`` is ``split`` or ``eval_split``) and its checked field mapping."""
    spec = getattr(src, which)
    ds = select_split(resolved.load(), spec, f"data.sources.{name}.{which}")
    columns = column_paths(ds.features)
    roles = mapping(name, src, columns)
    check_fields(name, roles, columns, f"{resolved.location} [{spec}]")
    return ds, roles


def check_sources(cfg: DataConfig) -> None:
    """Resolve every source and check its splits and field mappings (called by ``validate()``).

    A ``save_to_disk`` folder is checked from its JSON metadata alone, without importing
    ``datasets`` (seconds on a small machine), so a wrong field fails fast; other sources are
    opened through ``datasets``."""
    for name, src in cfg.sources.items():
        resolved = resolve_source(name, src, cfg.root)
        for which in ("split", "eval_split"):
            spec = getattr(src, which)
            if spec is None:
                continue
            columns = disk_columns(resolved, spec, f"data.sources.{name}.{which}")
            if columns is None:
                open_split(name, src, resolved, which)
            else:
                check_fields(name, mapping(name, src, columns), columns, f"{resolved.location} [{spec}]")


_SPLIT_SPEC = re.compile(r"^\s*(\w+)(\[[^\]]*\])?\s*$")


def disk_columns(resolved: ResolvedSource, spec: str, key: str) -> list[str] | None:
    """The columns of a ``save_to_disk`` folder's split(s) from ``dataset_dict.json`` and each split's
    ``dataset_info.json``; None where that metadata is not there (then ``datasets`` decides)."""
    if resolved.kind != "disk":
        return None
    root = Path(resolved.location)
    if (root / "dataset_dict.json").exists():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        folders = {s: root / s for s in splits}
    else:
        folders = {"train": root}
    names = [m.group(1) if (m := _SPLIT_SPEC.match(part)) else None for part in spec.split("+")]
    if None in names:
        return None  # an unusual spec: let datasets parse it
    missing = [n for n in names if n not in folders]
    if missing:
        raise ConfigError(f"{key}={spec!r} is not a split of this dataset (splits: {', '.join(folders)})")
    columns: list[str] | None = None
    for n in names:
        info = folders[n] / "dataset_info.json"
        if not info.exists():
            return None
        features = json.loads(info.read_text()).get("features")
        if not isinstance(features, dict):
            return None
        cols = json_columns(features)
        columns = cols if columns is None else [c for c in columns if c in cols]
    return columns


def json_columns(features: dict, prefix: str = "") -> list[str]:
    """:func:`column_paths` over the JSON form of ``datasets.Features``."""
    out = []
    for col, feat in features.items():
        out.append(prefix + col)
        inner = feat.get("feature", feat) if isinstance(feat, dict) and feat.get("_type") in _LISTS else feat
        if isinstance(inner, dict) and "_type" not in inner:
            out += json_columns(inner, f"{prefix}{col}.")
    return out


_LISTS = ("List", "Sequence", "LargeList")


# ------------------------------------------------------------------------------------------- examples
def _get(row: dict, path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        value = [v[part] for v in value] if isinstance(value, list) else value[part]
    return value


def _values(row: dict, roles: dict[str, str]) -> dict[str, Any]:
    return {r: _get(row, c) for r, c in roles.items()}


def _texts(values: dict[str, Any]) -> dict[str, str]:
    """The scalar role values as strings (what templates format; list roles are answers)."""
    return {r: "" if v is None else str(v) for r, v in values.items() if not isinstance(v, list)}


def _strings(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [str(v) for v in items if v is not None and str(v).strip()]


def to_example(
    name: str,
    src: SourceConfig,
    template: Template,
    roles: dict[str, str],
    row: dict,
    index: int,
    prompt: str | None = None,
) -> Example | None:
    """One row as an ``Example``; None when its target is empty (counted as skipped)."""
    values = _values(row, roles)
    ex_id = str(values["id"]) if "id" in values else f"{name}-{index}"
    text = _texts(values)
    prompt = prompt if prompt is not None else fewshot_prompt(template, text, (), src.description or None)
    if src.task_type == "instruction":
        answer = text.get("output", "")
        return Example(prompt, answer, "instruction", name, id=ex_id) if answer.strip() else None
    answers = _strings(values["answers"])
    if not answers:
        return None
    aliases = _strings(values["aliases"]) if "aliases" in values else answers
    return Example(prompt, answers[0], "cbqa", name, aliases=tuple(aliases or answers), id=ex_id)


def shot_pair(template: Template, roles: dict[str, str], row: dict) -> tuple[dict[str, str], str]:
    """A few-shot example's role values and its answer (first of ``template.shot_target``)."""
    values = _values(row, roles)
    role = next((r for r in (template.shot_target, "answers", "output") if r in values), None)
    target = _strings(values[role]) if role else []
    return _texts(values), (target[0] if target else "")


def rows(ds: Any, indices: list[int], roles: dict[str, str]) -> list[dict]:
    """The rows at ``indices`` with only the mapped top-level columns (TriviaQA carries big unused ones)."""
    top = sorted({c.split(".")[0] for c in roles.values()})
    return ds.select_columns(top).select(indices).to_list() if indices else []


def first_examples(cfg: DataConfig, n: int = 16) -> list[Example]:
    """The first ``n`` training rows of each source as examples: what checks before a run look at.
    A split read whole (``n`` rows or fewer) whose every target is empty fails here, before a run
    starts (a larger one fails when its mixture is built)."""
    out: list[Example] = []
    for name, src in cfg.sources.items():
        if src.split is None:
            continue
        resolved = resolve_source(name, src, cfg.root)
        ds, roles = open_split(name, src, resolved, "split")
        template = get_template(src.template, f"data.sources.{name}.template")
        picked = rows(ds, list(range(min(n, len(ds)))), roles)
        built = [e for i, r in enumerate(picked) if (e := to_example(name, src, template, roles, r, i)) is not None]
        if picked and not built and len(picked) == len(ds):
            raise no_targets(name, src, roles, resolved.location, "split", len(picked))
        out += built
    return out


# ------------------------------------------------------------------------------------------- the mix
def train_counts(cfg: DataConfig) -> dict[str, int]:
    """``num_examples`` where set; else a ``weight`` share of ``num_train`` (largest remainder, so
    the weighted sources add up to exactly ``num_train``)."""
    fixed = {n: s.num_examples for n, s in cfg.sources.items() if s.split and s.num_examples is not None}
    weights = {n: s.weight for n, s in cfg.sources.items() if s.split and s.num_examples is None}
    total = sum(weights.values())
    exact = {n: cfg.num_train * w / total if total else 0.0 for n, w in weights.items()}
    counts = {n: int(x) for n, x in exact.items()}
    short = (cfg.num_train - sum(counts.values())) if total else 0
    for n in sorted(exact, key=lambda n: (counts[n] - exact[n], n))[:short]:
        counts[n] += 1
    return {**counts, **fixed}


def sample_indices(n_rows: int, count: int, rng: random.Random) -> list[int]:
    """``count`` row indices without repetition until every row was taken once (then a new pass)."""
    out: list[int] = []
    while len(out) < count and n_rows:
        out += rng.sample(range(n_rows), n_rows)
    return out[:count]


@dataclass
class _SourceParts:
    train: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)
    eval: EvalSet | None = None
    info: dict = field(default_factory=dict)


def eval_set(name: str, src: SourceConfig, resolved: ResolvedSource, num_fewshot: int, limit: int | None) -> EvalSet:
    """The first ``eval_examples`` / ``limit`` rows of ``eval_split``; CBQA prompts carry ``num_fewshot``
    shots from ``split``, fixed per question (the same for every run seed and for the base model)."""
    template = get_template(src.template, f"data.sources.{name}.template")
    ds, roles = open_split(name, src, resolved, "eval_split")
    n = min([len(ds)] + [c for c in (src.eval_examples, limit) if c is not None])
    eval_rows = rows(ds, list(range(n)), roles)
    prompts: list[str | None] = [None] * n
    if src.task_type == "cbqa" and num_fewshot > 0:
        if src.split is None:
            raise ConfigError(
                f"eval.num_fewshot={num_fewshot} needs a train split but data.sources.{name}.split is null"
            )
        pool, pool_roles = open_split(name, src, resolved, "split")
        picks = [
            random.Random(f"fewshot-{name}-{i}").sample(range(len(pool)), min(num_fewshot, len(pool))) for i in range(n)
        ]
        needed = sorted({j for p in picks for j in p})
        by_index = dict(zip(needed, rows(pool, needed, pool_roles), strict=True))
        for i, pick in enumerate(picks):
            query = _texts(_values(eval_rows[i], roles))
            shots = [shot_pair(template, pool_roles, by_index[j]) for j in pick]
            prompts[i] = fewshot_prompt(template, query, shots, src.description or None)
    built = [to_example(name, src, template, roles, row, i, prompts[i]) for i, row in enumerate(eval_rows)]
    examples = [e for e in built if e is not None]
    require_targets(name, src, roles, resolved, "eval_split", len(built), len(examples))
    if src.task_type == "cbqa":
        return EvalSet(name, "cbqa", examples, metric="generate", match=src.match, stop=tuple(src.stop))
    return EvalSet(name, "instruction", examples, metric="response_loss")


def target_column(src: SourceConfig, roles: dict[str, str]) -> str:
    """The column a source's training target comes from (``answers`` or ``output`` mapped)."""
    role = "answers" if src.task_type == "cbqa" else "output"
    return roles.get(role, role)


def no_targets(
    name: str, src: SourceConfig, roles: dict[str, str], location: str, which: str, taken: int
) -> ConfigError:
    """The one-line error of a split whose every row taken has an empty target."""
    return ConfigError(
        f"data.sources.{name}.{which}: all {taken} rows taken from {location} [{getattr(src, which)}] have an "
        f"empty target ({target_column(src, roles)}): no usable example"
    )


def require_targets(
    name: str, src: SourceConfig, roles: dict[str, str], resolved: ResolvedSource, which: str, taken: int, kept: int
) -> None:
    """Rows whose target is empty are skipped, never silently: one warning line per source and split
    counts them, and a split whose rows all are fails in one line naming the source and its file
    (it would train, or evaluate, on nothing)."""
    if kept == taken:
        return
    if not kept:
        raise no_targets(name, src, roles, resolved.location, which, taken)
    log.warning(
        "data.sources.%s.%s: %d of the %d rows taken from %s [%s] have an empty target (%s) and are skipped",
        name,
        which,
        taken - kept,
        taken,
        resolved.location,
        getattr(src, which),
        target_column(src, roles),
    )


def source_parts(
    name: str, src: SourceConfig, root: str | None, count: int, seed: int, num_fewshot: int, limit: int | None
) -> _SourceParts:
    resolved = resolve_source(name, src, root)
    template = get_template(src.template, f"data.sources.{name}.template")
    parts = _SourceParts(info={"kind": resolved.kind, "location": resolved.location})
    if src.split is not None:
        ds, roles = open_split(name, src, resolved, "split")
        n_val = min(VALIDATION_PER_SOURCE, len(ds) // 10)
        pool = len(ds) - n_val
        if count and not pool:
            raise ConfigError(f"data.sources.{name}.split={src.split!r} has no rows to train on")
        picks = sample_indices(pool, count, random.Random(f"{seed}-{name}"))
        built = [
            to_example(name, src, template, roles, r, i) for i, r in zip(picks, rows(ds, picks, roles), strict=True)
        ]
        tail = list(range(pool, len(ds)))
        val = [to_example(name, src, template, roles, r, i) for i, r in zip(tail, rows(ds, tail, roles), strict=True)]
        parts.train = [e for e in built if e is not None]
        require_targets(name, src, roles, resolved, "split", len(built), len(parts.train))
        parts.validation = [e for e in val if e is not None]
        parts.info |= {
            "train": len(parts.train),
            "train_rows": pool,
            "skipped": len(built) - len(parts.train),
            "validation": len(parts.validation),
        }
    if src.eval_split is not None:
        parts.eval = eval_set(name, src, resolved, num_fewshot, limit)
        parts.info["eval"] = len(parts.eval.examples)
    return parts


def source_mixture(cfg: DataConfig, seed: int, num_fewshot: int = 0, eval_limit: int | None = None) -> Mixture:
    """Training examples of every source shuffled together by ``seed``; one evaluation set per source
    with an ``eval_split``; a validation list of held-out train rows interleaved across sources (so
    its head mixes task types, as ALoRA's scoring batch needs); per-source counts in ``info``."""
    counts = train_counts(cfg)
    parts = {
        n: source_parts(n, s, cfg.root, counts.get(n, 0), seed, num_fewshot, eval_limit) for n, s in cfg.sources.items()
    }
    train = [e for p in parts.values() for e in p.train]
    random.Random(seed).shuffle(train)
    validation = [e for group in zip_longest(*(p.validation for p in parts.values())) for e in group if e is not None]
    by_type = {t: sum(e.task_type == t for e in train) for t in ("cbqa", "instruction")}
    return Mixture(
        train=train,
        eval={n: p.eval for n, p in parts.items() if p.eval is not None},
        validation=validation,
        info={"train": by_type, "sources": {n: p.info for n, p in parts.items()}},
    )


# --------------------------------------------------------------------------------------- the kind
def check_real_data(cfg: TrainConfig, trains: bool) -> None:
    """Real datasets need a real tokenizer, and a run that trains needs training examples."""
    if cfg.model.source == "world":
        raise ConfigError(
            f"data={cfg.data.name!r} has real datasets (data.sources) but model.source=world: the "
            "built-in model's word-level vocabulary only covers the built-in world; choose a hub model "
            "(model=... model.name_or_path=...) or data=world_mix"
        )
    if trains and sum(train_counts(cfg.data).values()) == 0:
        names = ", ".join(cfg.data.sources)
        raise ConfigError(
            f"data.sources ({names}) give no training examples: every split is null or every "
            "num_examples / weight is 0 (data.sources.<name>.split, .num_examples, .weight)"
        )


def check_max_length(cfg: TrainConfig, tok, n: int = 16) -> None:
    """A ``data.max_length`` that cuts every example would train on answers without their questions
    (a warning at step 0 today): fail here, from the first ``n`` training rows of each source."""
    examples = first_examples(cfg.data, n)
    seq2seq = cfg.model.architecture == "seq2seq"
    max_length, chat = cfg.data.lengths(seq2seq), cfg.data.chat_template
    if examples and all(encode_example(tok, e.prompt, e.answer, max_length, chat).truncated for e in examples):
        key = "data.max_source_length / data.max_target_length" if seq2seq else "data.max_length"
        raise ConfigError(
            f"{key}={max_length} is shorter than every training example checked (the first "
            f"{n} of each source, {len(examples)} in all): their prompts would be cut; raise it"
        )
