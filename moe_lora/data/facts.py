"""Real facts (``data.facts``): closed-book questions about the real world, from installed packages.

Every fact comes from a well-kept PyPI package of the ``real`` extra; nothing is typed here:

- ``capital``: a country's capital city (``countryinfo``)
- ``currency``: a country's currency, named by ``pycountry`` from ``countryinfo``'s ISO 4217 code
  (the code is accepted too; countries with more than one currency are left out)
- ``symbol``: a chemical element's symbol (``periodictable``)
- ``element``: the element a symbol stands for (``periodictable``)

A fact whose answer is written in its question (Djibouti's capital is Djibouti) is left out: the
``contains`` rule would count an echo of the question as knowledge. Each relation has three
question templates. Facts are split once, by a hash of their id and ``data.facts.seed`` (the same
for every run seed): a ``train_fraction`` whose questions (any template) make the CBQA share of the
fine-tuning mix, and the rest, held out. The base model answers each held-out fact once in the
*calibration* template (the first); facts it gets right are *known* (the split is recorded in the
cache and in ``results.json["data"]``). Knowledge is measured on the known facts asked with the
*other* templates, so the facts are not chosen on the very prompts they are scored on (which would
put the base at 100% by construction and count every flip as forgetting). Held-out facts the base
does not know are the validation batch (ALoRA's scoring): never trained on, never scored.

Answers are matched by ``contains`` (:func:`moe_lora.eval.normalize.match_contains`, PopQA's
rule): an instruction-tuned model answers "The capital of Syria is Damascus.", which exact match
would count wrong.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import random
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, replace

from moe_lora.config import DataConfig, FactsConfig
from moe_lora.data.example import EvalSet, Example, Mixture
from moe_lora.errors import ConfigError

EXTRA_HINT = "pip install -e '.[real]' (make setup installs it)"
MATCH = "contains"
STOP = ("\n",)


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, answer) triple; ``aliases`` are other accepted answers."""

    relation: str
    subject: str
    answer: str
    aliases: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.relation}:{self.subject}"


def _countries() -> list:
    from countryinfo import all_countries  # noqa: PLC0415 (the optional real extra)

    return sorted(all_countries(), key=lambda c: c.name())


def _one(value) -> str | None:
    """A single string value (countryinfo gives one capital as a one-item list, or none as None)."""
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else None
    return value if isinstance(value, str) and value.strip() else None


def _capitals() -> list[Fact]:
    return [Fact("capital", c.name(), capital) for c in _countries() if (capital := _one(c.capital()))]


def _currencies() -> list[Fact]:
    import pycountry  # noqa: PLC0415 (the optional real extra)

    out = []
    for c in _countries():
        codes = c.currencies() or []
        currency = pycountry.currencies.get(alpha_3=codes[0]) if len(codes) == 1 else None
        if currency is not None:
            out.append(Fact("currency", c.name(), currency.name, (currency.alpha_3,)))
    return out


def _elements() -> list:
    import periodictable  # noqa: PLC0415 (the optional real extra)

    return [e for e in periodictable.elements if e.number > 0]


def _symbols() -> list[Fact]:
    return [Fact("symbol", e.name.capitalize(), e.symbol) for e in _elements()]


def _element_names() -> list[Fact]:
    return [Fact("element", e.symbol, e.name.capitalize()) for e in _elements()]


@dataclass(frozen=True)
class Relation:
    """Where a relation's facts come from and how it is asked; ``templates[0]`` calibrates."""

    load: Callable[[], list[Fact]]
    packages: tuple[str, ...]
    templates: tuple[str, ...]


RELATIONS: dict[str, Relation] = {
    "capital": Relation(
        _capitals,
        ("countryinfo",),
        (
            "What is the capital of {subject}?",
            "Which city is the capital of {subject}?",
            "Name the capital city of {subject}.",
        ),
    ),
    "currency": Relation(
        _currencies,
        ("countryinfo", "pycountry"),
        (
            "What is the currency of {subject}?",
            "Which currency is used in {subject}?",
            "What money do people pay with in {subject}?",
        ),
    ),
    "symbol": Relation(
        _symbols,
        ("periodictable",),
        (
            "What is the chemical symbol of {subject}?",
            "Which symbol stands for the element {subject}?",
            "How is {subject} written in the periodic table?",
        ),
    ),
    "element": Relation(
        _element_names,
        ("periodictable",),
        (
            "Which chemical element has the symbol {subject}?",
            "What element does the symbol {subject} stand for?",
            "Name the element with the chemical symbol {subject}.",
        ),
    ),
}


def check_facts(cfg: FactsConfig) -> None:
    """Known relations, their packages installed (one line naming the extra), facts to split."""
    for name in cfg.relations:
        if name not in RELATIONS:
            raise ConfigError(f"data.facts.relations: unknown relation {name!r} (known: {', '.join(RELATIONS)})")
        missing = [p for p in RELATIONS[name].packages if importlib.util.find_spec(p) is None]
        if missing:
            raise ConfigError(
                f"data.facts.relations: {name!r} reads its facts from {', '.join(missing)}, which is not "
                f"installed: {EXTRA_HINT}"
            )


def _words(text: str) -> str:
    """``moe_lora.eval.normalize.words`` (the ``contains`` rule's normalisation; data sits below
    eval, so it is repeated here, and a test holds the two equal)."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", folded.lower()).split())


def echoes(fact: Fact, text: str) -> bool:
    """Whether an accepted answer of ``fact`` occurs in ``text`` as whole words."""
    return any(f" {_words(a)} " in f" {_words(text)} " for a in (fact.answer, *fact.aliases))


@functools.cache
def relation_facts(name: str) -> tuple[Fact, ...]:
    """Every usable fact of a relation, in a fixed order (answers not written in the question)."""
    relation = RELATIONS[name]
    return tuple(
        f
        for f in relation.load()
        if _words(f.answer) and not any(echoes(f, t.format(subject=f.subject)) for t in relation.templates)
    )


def select_facts(cfg: FactsConfig) -> list[Fact]:
    """``per_relation`` facts of each relation (a sample fixed by ``data.facts.seed``), or all."""
    out: list[Fact] = []
    for name in cfg.relations:
        facts = list(relation_facts(name))
        if cfg.per_relation is not None and cfg.per_relation < len(facts):
            facts = random.Random(f"{cfg.seed}-{name}").sample(facts, cfg.per_relation)
        out += facts
    return out


def _unit(*parts: object) -> float:
    """A number in [0, 1) fixed by ``parts`` (stable across processes, unlike ``hash``)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:12], 16) / 16**12


def part(fact: Fact, cfg: FactsConfig) -> str:
    """``train`` (its questions may be trained on) or ``test`` (held out)."""
    return "train" if _unit("part", cfg.seed, fact.id) < cfg.train_fraction else "test"


def question(fact: Fact, template: int) -> Example:
    """The fact asked with one of its relation's templates (a CBQA example)."""
    text = RELATIONS[fact.relation].templates[template].format(subject=fact.subject)
    aliases = (fact.answer, *fact.aliases)
    return Example(text, fact.answer, "cbqa", fact.relation, aliases=aliases, id=f"{fact.id}#{template}")


def eval_template(fact: Fact, cfg: FactsConfig) -> int:
    """The held-out template a known fact is scored with (never the calibration template)."""
    others = len(RELATIONS[fact.relation].templates) - 1
    return 1 + int(_unit("template", cfg.seed, fact.id) * others)


def calibration_set(cfg: FactsConfig) -> list[Example]:
    """Every held-out fact in the calibration template: what decides which facts the base knows."""
    return [question(f, 0) for f in select_facts(cfg) if part(f, cfg) == "test"]


def fact_of(example_id: str) -> str:
    return example_id.split("#", 1)[0]


def facts_mixture(
    cfg: DataConfig, known: dict[str, bool], instructions: tuple[list[Example], list[Example], list[Example]], seed: int
) -> Mixture:
    """``num_train`` examples: a ``cbqa_ratio`` share of questions about the training facts
    (cycling through facts, then templates), the rest the given instruction examples; shuffled by
    ``seed``. ``known``: fact id -> whether the base answered its calibration question (every
    held-out fact). ``instructions``: (train, eval, validation) instruction examples."""
    facts = select_facts(cfg.facts)
    train_facts = [f for f in facts if part(f, cfg.facts) == "train"]
    test_facts = [f for f in facts if part(f, cfg.facts) == "test"]
    missing = [f.id for f in test_facts if f.id not in known]
    if missing:  # the calibration was run on another selection: never score a subset silently
        raise ConfigError(f"data.facts: {len(missing)} held-out facts were not calibrated (e.g. {missing[0]!r})")
    n_cbqa = round(cfg.num_train * cfg.cbqa_ratio)
    if n_cbqa and not train_facts:
        raise ConfigError(
            f"data.facts.train_fraction={cfg.facts.train_fraction} leaves no training facts for "
            f"data.cbqa_ratio={cfg.cbqa_ratio}"
        )
    cbqa = [
        question(
            train_facts[i % len(train_facts)], (i // len(train_facts)) % _templates(train_facts[i % len(train_facts)])
        )
        for i in range(n_cbqa)
    ]
    instr_train, instr_eval, instr_val = instructions
    train = cbqa + list(instr_train)
    random.Random(seed).shuffle(train)
    known_facts = [f for f in test_facts if known[f.id]]
    if not known_facts:
        raise ConfigError(
            f"data.facts: the base model knows none of the {len(test_facts)} held-out facts "
            "(calibration template): knowledge retained cannot be measured; add relations or facts"
        )
    scored = [question(f, eval_template(f, cfg.facts)) for f in known_facts][: cfg.facts.eval_examples]
    unknown = [question(f, 0) for f in test_facts if not known[f.id]]
    validation = [e for pair in zip(unknown, instr_val, strict=False) for e in pair]
    sets = {
        "facts": EvalSet("facts", "cbqa", scored, metric="generate", match=MATCH, stop=STOP),
        "instruction": EvalSet(
            "instruction",
            "instruction",
            [replace(e, id=f"instruction-{i}") for i, e in enumerate(instr_eval)],
            metric="teacher_forced",
            match="exact",
        ),
    }
    info = {
        "train": {"cbqa": n_cbqa, "instruction": len(instr_train)},
        "facts": {"relations": split_summary(facts, known, cfg.facts), "scored": len(scored)},
    }
    return Mixture(train=train, eval=sets, validation=validation, info=info)


def _templates(fact: Fact) -> int:
    return len(RELATIONS[fact.relation].templates)


def split_summary(facts: list[Fact], known: dict[str, bool], cfg: FactsConfig) -> dict[str, dict[str, int]]:
    """Per relation: facts, training facts, held-out facts, and held-out facts the base knows."""
    out: dict[str, dict[str, int]] = {}
    for f in facts:
        row = out.setdefault(f.relation, {"facts": 0, "train": 0, "test": 0, "known": 0})
        row["facts"] += 1
        row[part(f, cfg)] += 1
        row["known"] += int(bool(known.get(f.id)))
    return out
