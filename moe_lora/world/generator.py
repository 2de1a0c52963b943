"""The built-in synthetic world: the offline default data.

Fictional people with four attributes are rendered as biographies, several per person, each with
the facts in shuffled order and a random paraphrase per fact; that augmentation is what lets a tiny
model *extract* knowledge for people whose questions it never saw (without it, held-out extraction
stayed near 0.13 in our prototypes). Closed-book QA pairs (task type ``cbqa``) exist for everybody,
but only the *trained* people's pairs ever appear in training text; CBQA is evaluated on the
held-out people (``validation`` and ``test`` splits), so a correct answer can only come from
knowledge stored during pretraining.

Instruction tasks (task type ``instruction``) need no world knowledge and have exact answers.
Every word of the vocabulary occurs in the pretraining text: words that never occur there keep
near-identical embeddings and the instruction tasks then do not train.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

from moe_lora.config import WorldConfig
from moe_lora.data.example import Example

FIRST_NAMES = (
    "alba bram cato dara elio fenna gil hana ivo jana kees lien milo nora otto pia quin rosa sven "
    "tara ugo vera wim xena yara zeno arno bea cas dirk eva floor gijs hugo iris joris kim lars "
    "maud niels"
).split()
LAST_NAMES = (
    "adler brink cohen dekker elsen faber goris hendriks imhof jansen kuiper lammers mulder "
    "noordam olsen peeters quast ruiter smit tromp uiterwijk vos wouters xander yilmaz zwart "
    "aalders bakker claes dijkstra"
).split()

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "birth_city": tuple(
        "amsterdam berlin cairo dublin espoo florence geneva havana istanbul jakarta kyoto lima "
        "madrid nairobi oslo porto quito riga sydney tunis".split()
    ),
    "birth_year": tuple(str(y) for y in range(1950, 1990)),
    "university": tuple(
        "harvard oxford cambridge stanford princeton yale caltech cornell sorbonne leiden delft "
        "uppsala heidelberg bologna coimbra".split()
    ),
    "employer": tuple(
        "acme globex initech umbrella hooli vandelay wonka cyberdyne soylent tyrell wayne stark "
        "oscorp aperture massive gringotts monarch pied dunder sterling".split()
    ),
}

# Several paraphrases per fact for biographies; `{n}` is the full name, `{v}` the value.
BIO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_city": (
        "{n} was born in {v} .",
        "{n} came into this world in {v} .",
        "the birthplace of {n} is {v} .",
        "{n} spent the early years of life in {v} .",
    ),
    "birth_year": (
        "{n} was born in the year {v} .",
        "{n} has {v} as the year of birth .",
        "the birth year of {n} is {v} .",
        "{n} came into the world in {v} .",
    ),
    "university": (
        "{n} studied at {v} .",
        "{n} graduated from {v} .",
        "{n} received an education at {v} .",
        "the alma mater of {n} is {v} .",
    ),
    "employer": (
        "{n} works for {v} .",
        "{n} is employed by {v} .",
        "{n} earns a living at {v} .",
        "the employer of {n} is {v} .",
    ),
}

QUESTIONS: dict[str, str] = {
    "birth_city": "Q : where was {n} born ? A :",
    "birth_year": "Q : in which year was {n} born ? A :",
    "university": "Q : which university did {n} attend ? A :",
    "employer": "Q : which company does {n} work for ? A :",
}

# Instruction tasks: symbols with exact answers and no world knowledge.
SYMBOLS = "cat dog fox owl bee ant elk yak emu cow pig hen rat bat eel ram".split()
UPPER = {s: s.upper() for s in SYMBOLS}
NUMBERS = [str(i) for i in range(30)]
INSTRUCTION_TASKS = ("reverse", "sort", "upper")
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")


@dataclass(frozen=True)
class Person:
    name: str
    facts: dict[str, str]


class World:
    """A deterministic world generated from a :class:`WorldConfig`."""

    def __init__(self, cfg: WorldConfig) -> None:
        self.cfg = cfg
        rng = random.Random(cfg.seed)
        pairs = [(f, last) for f in FIRST_NAMES for last in LAST_NAMES]
        if cfg.num_people > len(pairs):
            raise ValueError(f"data.world.num_people={cfg.num_people} exceeds the {len(pairs)} available names")
        names = [f"{f} {last}" for f, last in rng.sample(pairs, cfg.num_people)]
        self.people = [Person(n, {a: rng.choice(vals) for a, vals in ATTRIBUTES.items()}) for n in names]
        n_train = max(1, round(cfg.num_people * cfg.trained_fraction))
        n_val = (cfg.num_people - n_train) // 2
        self.splits: dict[str, list[Person]] = {
            "train": self.people[:n_train],
            "validation": self.people[n_train : n_train + n_val],
            "test": self.people[n_train + n_val :],
        }
        self._rng = rng

    # ------------------------------------------------------------------------------------ text
    def biographies(self) -> list[str]:
        """``bios_per_person`` biographies per person: shuffled facts, random paraphrases."""
        rng = random.Random(self.cfg.seed + 1)
        bios = []
        for p in self.people:
            for _ in range(self.cfg.bios_per_person):
                attrs = list(ATTRIBUTES)
                rng.shuffle(attrs)
                bios.append(" ".join(rng.choice(BIO_TEMPLATES[a]).format(n=p.name, v=p.facts[a]) for a in attrs))
        return bios

    def qa(self, split: str) -> list[Example]:
        """Closed-book QA pairs about the people of one split."""
        return [
            Example(QUESTIONS[a].format(n=p.name), p.facts[a], "cbqa", a, ATTRIBUTES[a])
            for p in self.splits[split]
            for a in ATTRIBUTES
        ]

    def vocabulary_text(self, n: int = 300) -> list[str]:
        """Lines that put every instruction word into the pretraining text, plus the general skills
        a real pretrained model brings (copying a sequence, the capital form of a word, the order of
        numbers), without teaching any task format: no task keyword is followed by its answer."""
        rng = random.Random(self.cfg.seed + 2)
        words = SYMBOLS + list(UPPER.values()) + NUMBERS + list(INSTRUCTION_TASKS) + ["=>"]
        lines = []
        for i in range(n):  # copying: the skill behind induction heads
            seq = [words[i % len(words)]] + [rng.choice(words) for _ in range(rng.randint(1, 5))]
            rng.shuffle(seq)
            lines.append(f"words : {' '.join(seq)} . again : {' '.join(seq)} .")
        for s in SYMBOLS * 3:
            lines.append(f"the capital form of {s} is {UPPER[s]} .")
        lines += ["numbers : " + " ".join(NUMBERS) + " ."] * 5
        for _ in range(n // 3):
            lines.append("counting : " + " ".join(sorted(rng.sample(NUMBERS, rng.randint(2, 5)), key=int)) + " .")
        return lines

    def pretraining_corpus(self) -> list[str]:
        """Biographies of everybody + QA of the trained people + vocabulary filler."""
        qa = [f"{e.prompt} {e.answer}" for e in self.qa("train")]
        return self.biographies() + qa + self.vocabulary_text()

    # ---------------------------------------------------------------------------- vocabulary
    @cached_property
    def vocab(self) -> list[str]:
        """Every word the world can produce, specials first, in a deterministic order."""
        words: dict[str, None] = dict.fromkeys(SPECIAL_TOKENS)
        texts = [*self.biographies(), *self.vocabulary_text()]
        texts += [e.prompt for split in self.splits for e in self.qa(split)]
        texts += [v for vals in ATTRIBUTES.values() for v in vals]
        for t in texts:
            for w in t.split():
                words.setdefault(w, None)
        return list(words)


def instruction_example(task: str, rng: random.Random, items: tuple[int, int] = (2, 5)) -> Example:
    """One instruction example of a sub-task with ``items`` (min, max) list items; exact answers."""
    k = rng.randint(*items)
    if task == "reverse":
        items = [rng.choice(SYMBOLS) for _ in range(k)]
        answer = list(reversed(items))
    elif task == "sort":
        items = rng.sample(NUMBERS, k)
        answer = sorted(items, key=int)
    elif task == "upper":
        items = [rng.choice(SYMBOLS) for _ in range(k)]
        answer = [UPPER[s] for s in items]
    else:
        raise ValueError(f"unknown instruction task {task!r}; known: {', '.join(INSTRUCTION_TASKS)}")
    return Example(f"{task} : {' '.join(items)} =>", " ".join(answer), "instruction", task)


def instruction_examples(
    tasks: list[str], n_per_task: int, seed: int, items: tuple[int, int] = (2, 5)
) -> list[Example]:
    rng = random.Random(seed)
    return [instruction_example(t, rng, items) for t in tasks for _ in range(n_per_task)]


# ------------------------------------------------------------------ multiple choice (toy T0 twin)
# Tasks with answer choices, grouped in clusters as T0 groups its datasets; data=world_t0 trains on
# some clusters and judges the others zero-shot by rank classification. A knowledge task asks one
# attribute of a person (the trained people in training, the held-out test people in evaluation);
# a symbol task is an instruction task. Every task has three prompt templates.
MC_CLUSTERS: dict[str, tuple[str, ...]] = {
    "places": ("birth_city", "university"),
    "time": ("birth_year",),
    "work": ("employer",),
    "symbols": ("reverse", "upper"),
    "numbers": ("sort",),
}
MC_TEMPLATES = ("choices", "options", "pick")
MC_WORDS = ("choices", "options", "question", "answer", "pick", "one", ",", "or")  # the T5 twin's extra words
MC_CHOICES = 4


def _mc_prompt(template: str, question: str, choices: list[str]) -> str:
    """``question`` ends in ``?`` (knowledge) or ``=>`` (symbols); the answer follows the prompt."""
    if template == "choices":
        return f"{question} choices : {' , '.join(choices)} A :"
    if template == "options":
        return f"question : {question} options : {' or '.join(choices)} . answer :"
    return f"pick one : {' , '.join(choices)} . {question} A :"


def _distractors(answer: str, pool: list[str], rng: random.Random) -> list[str]:
    others = [v for v in dict.fromkeys(pool) if v != answer]
    choices = [answer, *rng.sample(others, min(MC_CHOICES - 1, len(others)))]
    rng.shuffle(choices)
    return choices


def _symbol_choices(task: str, rng: random.Random, items: tuple[int, int]) -> tuple[str, list[str]]:
    ex = instruction_example(task, rng, items)
    source = ex.prompt.split(" : ", 1)[1].removesuffix(" =>").split()
    pool = [" ".join(source), " ".join(reversed(ex.answer.split())), " ".join(sorted(source))]
    if task == "upper":
        pool = [
            " ".join(source),
            " ".join(UPPER[rng.choice(SYMBOLS)] for _ in source),
            " ".join(s.upper() for s in reversed(source)),
        ]
    kind = {"reverse": SYMBOLS, "sort": NUMBERS, "upper": list(UPPER.values())}[task]
    while len(set(pool) - {ex.answer}) < MC_CHOICES - 1:  # random answers of the right kind and length
        pool.append(" ".join(rng.choice(kind) for _ in source))
    return ex.prompt, _distractors(ex.answer, pool, rng)


def mc_examples(
    world: World, task: str, cluster: str, n: int, split: str, rng: random.Random, items=(2, 3)
) -> list[Example]:
    """``n`` examples of one task, templates in turn; knowledge tasks ask about ``split``'s people."""
    out = []
    people = world.splits[split]
    for i in range(n):
        template = MC_TEMPLATES[i % len(MC_TEMPLATES)]
        if task in ATTRIBUTES:
            person = people[rng.randrange(len(people))]
            answer = person.facts[task]
            question = QUESTIONS[task].format(n=person.name).removesuffix(" A :")
            choices = _distractors(answer, list(ATTRIBUTES[task]), rng)
            kind = "cbqa"
        else:
            question, choices = _symbol_choices(task, rng, items)
            answer = next(c for c in choices if c == instruction_answer(question))
            kind = "instruction"
        out.append(
            Example(
                _mc_prompt(template, question, choices),
                answer,
                kind,
                cluster,
                id=f"{task}/{template}/{i}",
                choices=tuple(choices),
                template=template,
            )
        )
    return out


def instruction_answer(prompt: str) -> str:
    """The exact answer of an instruction prompt ``task : items =>``."""
    task, rest = prompt.split(" : ", 1)
    items = rest.removesuffix(" =>").split()
    if task == "reverse":
        return " ".join(reversed(items))
    if task == "sort":
        return " ".join(sorted(items, key=int))
    return " ".join(UPPER[s] for s in items)


def mc_filler(n: int, seed: int) -> list[str]:
    """Pretraining lines that put the multiple-choice words into the T5 twin's text without any task
    format (lists of words joined by them), as ``vocabulary_text`` does for the instruction words."""
    rng = random.Random(seed + 3)
    words = SYMBOLS + NUMBERS + [v for vals in ATTRIBUTES.values() for v in vals]
    lines = []
    for _ in range(n):
        a, b, c = rng.sample(words, 3)
        lines.append(f"{rng.choice(MC_WORDS[:6])} : {a} , {b} or {c} .")
    return lines
