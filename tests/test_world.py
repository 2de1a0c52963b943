"""The built-in world: deterministic, splits disjoint, held-out questions never in training text."""

from __future__ import annotations

from collections import Counter

from moe_lora.config import DataConfig, WorldConfig
from moe_lora.world.generator import World
from moe_lora.world.mixture import world_mixture


def test_world_is_deterministic() -> None:
    a, b = World(WorldConfig(seed=3)), World(WorldConfig(seed=3))
    assert a.pretraining_corpus() == b.pretraining_corpus() and a.vocab == b.vocab
    assert World(WorldConfig(seed=4)).pretraining_corpus() != a.pretraining_corpus()


def test_held_out_questions_never_appear_in_training_text() -> None:
    world = World(WorldConfig())
    mix = world_mixture(DataConfig(cbqa_ratio=0.5), world, seed=0)
    training_text = "\n".join(world.pretraining_corpus() + [f"{e.prompt} {e.answer}" for e in mix.train])
    held = world.qa("validation") + world.qa("test")
    assert held and all(e.prompt not in training_text for e in held)
    held_names = {p.name for s in ("validation", "test") for p in world.splits[s]}
    assert not held_names & {p.name for p in world.splits["train"]}
    assert all(e.prompt in training_text for e in world.qa("train"))  # the trained half is in there
    assert {e.task_type for e in mix.train} == {"cbqa", "instruction"}


def test_every_vocabulary_word_occurs_in_pretraining() -> None:
    world = World(WorldConfig())
    counts = Counter(w for t in world.pretraining_corpus() for w in t.split())
    assert [w for w in world.vocab if w not in counts] == ["<pad>", "<eos>", "<unk>"]


def test_mixture_ratio_and_eval_sets() -> None:
    world = World(WorldConfig())
    mix = world_mixture(DataConfig(num_train=1000, cbqa_ratio=0.2, eval_per_task=50), world, seed=1)
    assert len(mix.train) == 1000 and sum(e.task_type == "cbqa" for e in mix.train) == 200
    instruction = mix.eval["instruction"].examples
    assert len(instruction) == 150 and not {e.prompt for e in instruction} & {e.prompt for e in mix.train}
    assert [(e.prompt, e.answer) for e in mix.eval["cbqa"].examples] == [(e.prompt, e.answer) for e in world.qa("test")]
    assert len({e.id for e in instruction}) == len(instruction)  # ids for predictions.jsonl
