"""What every data source produces: prompt/answer examples with a task type, grouped into a
training list and named evaluation sets. The world (``data/world.py``) and the hub/local sources
(``data/sources.py``) both build these, so the loop and the evaluation never ask where data came
from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair; ``task_type`` routes the LBC and the routing statistics."""

    prompt: str
    answer: str
    task_type: str  # "cbqa" | "instruction"
    subtask: str  # world: attribute or task name; sources: the source name
    candidates: tuple[str, ...] = ()  # possible answers (world cbqa: every value of the attribute)
    aliases: tuple[str, ...] = ()  # other accepted answers (TriviaQA aliases, NQ's answer list)
    id: str = ""  # stable id within its set (predictions.jsonl)
    choices: tuple[str, ...] = ()  # answer choices of a multiple-choice example (rank classification)
    template: str = ""  # the prompt template it was written with (rank classification: per template)


@dataclass(frozen=True)
class EvalSet:
    """A named evaluation set and how it is scored.

    ``metric``: ``teacher_forced`` (world CBQA: one forward pass, exact iff every answer token is
    the arg-max; also gives candidate accuracy), ``generate`` (batched greedy generation cut at
    ``stop``, then ``match``), ``response_loss`` (mean cross-entropy on response tokens; held-out
    instruction data of real sources). ``match``: ``triviaqa`` / ``nq_open`` (lm-eval's rules) or
    ``exact`` (string equality after stripping; world instruction tasks)."""

    name: str
    task_type: str
    examples: list[Example]
    metric: str = "generate"
    match: str = "exact"
    stop: tuple[str, ...] = ("\n",)


@dataclass
class Mixture:
    train: list[Example]
    eval: dict[str, EvalSet]  # world: "cbqa", "instruction"; sources: one per source with an eval split
    validation: list[Example]  # model selection, ALoRA's scoring batch
    info: dict = field(default_factory=dict)  # per-source counts, for results.json["data"]
