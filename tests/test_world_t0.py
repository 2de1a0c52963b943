"""The toy T0 (data=world_t0): multiple-choice world tasks in clusters, held-out clusters scored
zero-shot by rank classification; and the T5 twin of the world model (prefix-LM pretraining)."""

from __future__ import annotations

import random

import pytest

from moe_lora.config import DataConfig, WorldConfig
from moe_lora.world.generator import MC_CLUSTERS, MC_TEMPLATES, World, instruction_answer, mc_examples
from moe_lora.world.mixture import world_t0_mixture


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(num_people=40, bios_per_person=2))


def test_every_task_gives_distinct_choices_holding_the_answer(world) -> None:
    rng = random.Random(0)
    for cluster, tasks in MC_CLUSTERS.items():
        for task in tasks:
            for ex in mc_examples(world, task, cluster, 30, "train", rng):
                assert len(set(ex.choices)) == len(ex.choices) == 4 and ex.answer in ex.choices
                assert ex.template in MC_TEMPLATES and ex.subtask == cluster
                assert all(c in ex.prompt for c in ex.choices)
    assert instruction_answer("sort : 13 2 =>") == "2 13" and instruction_answer("upper : cat =>") == "CAT"


def test_held_out_clusters_are_never_trained_and_ask_about_held_out_people(world) -> None:
    cfg = DataConfig(num_train=60, mc_train_clusters=["places", "symbols"], mc_eval_clusters=["work"], eval_per_task=9)
    mix = world_t0_mixture(cfg, world, seed=0)
    assert {e.subtask for e in mix.train} == {"places", "symbols"} and len(mix.train) == 60
    assert set(mix.eval) == {"employer"} and mix.eval["employer"].metric == "rank_classification"
    test_people = {p.name for p in world.splits["test"]}
    for ex in mix.eval["employer"].examples:
        assert any(name in ex.prompt for name in test_people)
    assert {e.template for e in mix.eval["employer"].examples} == set(MC_TEMPLATES)
    again = world_t0_mixture(cfg, world, seed=1)
    assert [e.prompt for e in again.eval["employer"].examples] == [e.prompt for e in mix.eval["employer"].examples]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.mc_train_clusters=[places]", "data.mc_eval_clusters=[places]"], "are trained too"),
        (["data.mc_train_clusters=[placez]"], "data.mc_train_clusters has unknown clusters ['placez']"),
    ],
)
def test_bad_clusters_fail_in_one_line(run_cli, tmp_path, overrides, message) -> None:
    code, out, err = run_cli(
        "train", "model=tiny_world_t5", "data=world_t0", *overrides, f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert code != 0 and message in out + err and not (tmp_path / "r").exists()


@pytest.mark.slow  # pretrains the T5 twin: ~8 s
def test_the_t5_twin_pretrains_on_the_world_and_runs_the_toy_t0(run_cli, tmp_path) -> None:
    import json

    code, out, err = run_cli(
        "train",
        "model=tiny_world_t5",
        "data=world_t0",
        "+arm=mov_t5_e2",
        "data.eval_per_task=12",
        "recipe.loss_normalization=sequence",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert code == 0, out + err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["model"]["family"] == "t5" and set(results["metrics"]["rank_acc"]) == {"employer", "sort"}
    assert set(results["metrics"]["rank_acc"]["employer"]) == set(MC_TEMPLATES)
    routing = [json.loads(x) for x in (tmp_path / "run" / "routing.jsonl").read_text().splitlines()]
    modules = {r["module"] for r in routing}
    assert any(m.startswith("encoder.") for m in modules) and any("EncDecAttention" in m for m in modules)


def test_prefix_lm_batches_split_documents_and_questions_at_the_answer() -> None:
    from moe_lora.data.collate import IGNORE, collate_prefix_lm
    from moe_lora.world.tokenizer import word_tokenizer

    tok = word_tokenizer(["<pad>", "<eos>", "<unk>", "Q", ":", "who", "?", "A", "bob", "was", "here", "."])
    batch = collate_prefix_lm(["Q : who ? A : bob", "bob was here ."], tok, 16, random.Random(0))
    src = tok.convert_ids_to_tokens(batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist())
    tgt = tok.convert_ids_to_tokens(batch["labels"][0][batch["labels"][0] != IGNORE].tolist())
    assert src == ["Q", ":", "who", "?", "A", ":", "<eos>"] and tgt == ["bob", "<eos>"]
    assert (batch["labels"][1] != IGNORE).sum() >= 2  # some of the document, then EOS
