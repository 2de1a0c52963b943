"""P3 (the T0 mixture) on tiny random T5 checkpoints: P3-schema fixture configs under data.root,
templates found by prefix, T0's capped proportional mixing, and rank classification per held-out
dataset and template whose prediction rows reproduce every reported accuracy."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

import pytest

from moe_lora.config import DataConfig, P3Config
from moe_lora.data.p3 import allocate, capped_sizes, p3_mixture, templates_of
from tests.conftest import first_fast


@pytest.fixture(scope="module")
def p3_root(tmp_path_factory):
    from tests.fixtures.p3 import write_p3_root

    return write_p3_root(tmp_path_factory.mktemp("p3"))


@pytest.fixture(scope="module")
def t5s(tmp_path_factory):
    from tests.fixtures.checkpoints import make_t5_checkpoint

    root = tmp_path_factory.mktemp("t5p3")
    return {
        "v1_1": make_t5_checkpoint(root / "v1_1", d_model=24, d_ff=40, d_kv=6, encoder_layers=2, decoder_layers=2),
        "v1_0": make_t5_checkpoint(root / "v1_0", gated=False, seed=1, encoder_layers=1, decoder_layers=2),
    }


def data(root, **p3) -> DataConfig:
    return DataConfig(root=str(root), num_train=40, p3=P3Config(**p3))


def test_templates_are_the_configs_that_start_with_a_dataset(p3_root) -> None:
    found = templates_of(
        P3Config(train_datasets=["ag_news", "imdb"], eval_datasets=["super_glue_rte", "anli_r1"]), str(p3_root)
    )
    assert set(found["ag_news"]) == {"classify_question_first", "which_section"}
    assert set(found["super_glue_rte"]) == {"GPT_3_style", "does_it_follow_that"}  # the _score_eval twin skipped
    assert found["anli_r1"] == {"GPT_3_style": "anli_GPT_3_style_r1", "can_we_infer": "anli_can_we_infer_r1"}


def test_t0_mixing_caps_each_dataset_over_its_templates_and_samples_in_proportion() -> None:
    assert capped_sizes({"a": 10, "b": 3}, 2, cap=10) == {"a": 5, "b": 3}
    assert allocate({"a": 5, "b": 3, "c": 0}, 4) == {"a": 3, "b": 1, "c": 0}
    assert sum(allocate({"a": 7, "b": 7, "c": 7}, 10).values()) == 10
    assert allocate({"a": 2}, 9) == {"a": 2}  # never more rows than a config has


def test_the_mixture_trains_on_training_templates_and_holds_out_evaluation_datasets(p3_root) -> None:
    cfg = data(
        p3_root, train_datasets=["ag_news", "imdb"], eval_datasets=["super_glue_rte"], clusters={"imdb": "sentiment"}
    )
    mix = p3_mixture(cfg, seed=0)
    assert len(mix.train) == 40 and {e.template for e in mix.train} >= {"which_section", "Movie_Expressed_Sentiment"}
    assert all(not e.choices for e in mix.train) and {e.subtask for e in mix.train} == {"ag_news", "sentiment"}
    rte = mix.eval["super_glue_rte"]
    assert rte.metric == "rank_classification" and {e.template for e in rte.examples} == {
        "GPT_3_style",
        "does_it_follow_that",
    }
    assert all(e.answer in e.choices for e in rte.examples)
    narrowed = data(p3_root, eval_datasets=["super_glue_rte"], eval_templates={"super_glue_rte": ["GPT_3_style"]})
    assert {e.template for e in p3_mixture(narrowed, 0).eval["super_glue_rte"].examples} == {"GPT_3_style"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.p3.train_datasets=[ag_newz]"], "data.p3.train_datasets: 'ag_newz' has no template"),
        (["+data.p3.eval_templates.super_glue_rte=[nope]"], "data.p3.eval_templates.super_glue_rte: ['nope']"),
        (["data.p3.train_split=dev"], "has no split 'dev'"),
    ],
)
def test_bad_p3_settings_fail_in_one_line_naming_the_key(run_cli, p3_root, t5s, tmp_path, overrides, message) -> None:
    code, out, err = run_cli(*_train_args(p3_root, t5s["v1_1"], "ia3", tmp_path), *overrides, tiny=False)
    assert code != 0 and message in out + err
    assert not (tmp_path / "run").exists()


def _train_args(root, model, adapter, tmp_path) -> list[str]:
    return [
        "train",
        "model.source=hub",
        f"model.name_or_path={model}",
        f"adapter={adapter}",
        "data=p3_t0",
        f"data.root={root}",
        "data.p3.train_datasets=[ag_news,imdb]",
        "data.p3.eval_datasets=[super_glue_rte,anli_r1]",
        "data.num_train=48",
        "data.max_source_length=48",
        "data.max_target_length=6",
        "recipe=smoke",
        "recipe.max_steps=4",
        "recipe.threads=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]


@pytest.mark.parametrize(
    ("version", "adapter"),
    first_fast([(v, a) for v in ("v1_1", "v1_0") for a in ("ia3", "mov", "lora", "molora", "full")]),
)
def test_t5_trains_on_p3_and_predictions_reproduce_rank_accuracy(
    run_cli, p3_root, t5s, tmp_path, version, adapter
) -> None:
    code, out, err = run_cli(*_train_args(p3_root, t5s[version], adapter, tmp_path), tiny=False)
    assert code == 0, out + err
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    metrics = results["metrics"]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses and all(loss == loss for loss in losses)  # trained, finite
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    tuned = [r for r in rows if r["model"] == "tuned"]
    by = defaultdict(list)
    for r in tuned:
        best = max(range(len(r["choices"])), key=r["choice_scores"].__getitem__)
        assert r["prediction"] == r["choices"][best] and r["correct"] == (r["prediction"] in r["answers"])
        by[(r["task"], r["template"])].append(r["correct"])
    assert set(metrics["rank_acc"]) == {"super_glue_rte", "anli_r1"}
    for (task, template), correct in by.items():
        assert metrics["rank_acc"][task][template] == pytest.approx(sum(correct) / len(correct))
    for task, per_template in metrics["rank_acc"].items():
        assert metrics["rank_acc_by_set"][task] == pytest.approx(statistics.median(per_template.values()))
    assert metrics["t0_score"] == pytest.approx(statistics.mean(metrics["rank_acc_by_set"].values()))
    assert "t0_score_base" in metrics


def test_p3_with_the_world_model_is_refused(run_cli, p3_root, tmp_path) -> None:
    code, out, err = run_cli("train", "data=p3_t0", f"data.root={p3_root}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code != 0 and "model.source=world" in out + err


def test_prepare_data_fetches_the_p3_configs_of_the_listed_datasets(tmp_path) -> None:
    import datasets

    from scripts.prepare_data import prepare_p3

    available = [
        "ag_news_classify",
        "ag_news_classify_score_eval",
        "imdb_x",
        "anli_GPT_3_style_r1",
        "anli_GPT_3_style_r2",
    ]
    loaded = []

    def load(path: str, config: str | None):
        loaded.append((path, config))
        return datasets.DatasetDict(
            {"train": datasets.Dataset.from_list([{"inputs_pretokenized": "a", "targets_pretokenized": "b"}])}
        )

    p3 = P3Config(train_datasets=["ag_news"], eval_datasets=["anli_r1"])
    written = prepare_p3(p3, tmp_path, list_configs=lambda path: available, load=load)
    assert [c for _, c in loaded] == ["ag_news_classify", "anli_GPT_3_style_r1"] and {p.name for p in written} == {
        "ag_news_classify",
        "anli_GPT_3_style_r1",
    }
    assert all(path == "bigscience/P3" for path, _ in loaded)
    assert templates_of(p3, str(tmp_path)) == {
        "ag_news": {"classify": "ag_news_classify"},
        "anli_r1": {"GPT_3_style": "anli_GPT_3_style_r1"},
    }


def test_the_paper_preset_runs_end_to_end_on_a_tiny_t5_and_p3_files(run_cli, p3_root, t5s, tmp_path) -> None:
    """experiment=mov_molora_t0_paper with the T5-XL swapped for a tiny T5 and P3-shaped files."""
    code, out, err = run_cli(
        "train",
        "experiment=mov_molora_t0_paper",
        f"model.name_or_path={t5s['v1_1']}",
        f"data.root={p3_root}",
        "data.p3.train_datasets=[ag_news,imdb]",
        "data.p3.eval_datasets=[super_glue_rte]",
        "data.num_train=32",
        "recipe=smoke",
        "recipe.optimizer=adafactor_t5x",
        "recipe.scheduler=constant",
        "recipe.loss_normalization=sequence",
        "recipe.threads=1",
        "+arm=mov_t5_e10",
        f"hydra.run.dir={tmp_path / 'run'}",
        tiny=False,
    )
    assert code == 0, out + err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (
        results["config"]["recipe"]["optimizer"] == "adafactor_t5x"
        and results["config"]["adapter"]["num_experts"] == 10
    )
    assert set(results["metrics"]["rank_acc"]) == {"super_glue_rte"} and results["metrics"]["t0_score"] is not None
