"""Data kinds by name: the built-in configs select the kind they did before the registry, two kinds
asked for fail in one line, and a new kind is one file (tests/data/kind_people.py) that validates
and trains through the normal path."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from moe_lora.data.kinds import DataKind, register_kind
from moe_lora.errors import ConfigError
from moe_lora.recipes.compose import compose, load_config
from moe_lora.recipes.kinds import DATA_KINDS, kind_of
from tests.data import kind_people


def data_of(*overrides: str):
    return OmegaConf.to_object(compose(list(overrides))).data


@pytest.mark.parametrize(
    ("overrides", "kind"),
    [([], "world"), (["data=world_t0"], "world_t0"), (["data=triviaqa_alpaca"], "sources"), (["data=p3_t0"], "p3")],
)
def test_configs_select_the_kind_they_did_before(overrides, kind) -> None:
    assert kind_of(data_of(*overrides)).name == kind


def test_two_kinds_asked_for_fail_in_one_line() -> None:
    data = data_of("data=world_t0")
    data.name = kind_people.NAME
    with pytest.raises(ConfigError, match=r"^data.name=people_qa and data.mc_train_clusters are both set"):
        kind_of(data)
    data.name, data.mc_train_clusters, data.mc_eval_clusters = "mix", [], []
    data.p3.train_datasets, data.sources = ["ag_news"], {"x": None}
    with pytest.raises(ConfigError, match=r"^data.p3 and data.sources are both set: a mixture is of one data kind"):
        kind_of(data)


def test_held_out_clusters_alone_are_the_toy_t0_and_fail_its_check() -> None:
    with pytest.raises(ConfigError, match=r"data.mc_train_clusters is empty"):
        load_config(["data.mc_eval_clusters=[work]"], check_files=False)


def test_registering_is_checked() -> None:
    with pytest.raises(ValueError, match=r"'world' is registered twice"):
        register_kind(DataKind("world", kind_people.build, matches=kind_people.asks, key="data.name"))
    with pytest.raises(ValueError, match=r"both the default"):
        register_kind(DataKind("second_default", kind_people.build))
    with pytest.raises(ValueError, match=r"names its setting"):
        DataKind("no_key", kind_people.build, matches=kind_people.asks)
    assert "second_default" not in DATA_KINDS


@pytest.mark.slow  # a training run, like tests/test_end_to_end.py
def test_a_new_kind_is_one_file(run_cli, tmp_path) -> None:
    assert kind_people.NAME in DATA_KINDS  # registered by importing its module, nothing else
    with pytest.raises(ConfigError, match=r"data.cbqa_ratio=0.1: data=people_qa"):  # its check runs in validate
        load_config([f"data.name={kind_people.NAME}"], check_files=False)
    run_dir = tmp_path / "run"
    code, out, err = run_cli(
        "train", f"data.name={kind_people.NAME}", "data.cbqa_ratio=1.0", f"hydra.run.dir={run_dir}"
    )
    assert code == 0, out + err
    res = json.loads((run_dir / "results.json").read_text())
    assert res["data"]["kind"] == kind_people.NAME and res["data"]["train"] == {"cbqa": 200, "instruction": 0}
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert {p["task"] for p in predictions} == {"people"} and {p["model"] for p in predictions} == {"base", "tuned"}
    assert all(p["id"].startswith("people-") for p in predictions)


def test_every_file_in_recipes_kinds_is_imported_and_registers_a_kind() -> None:
    """A kind shipped with moe_lora is one file in moe_lora/recipes/kinds/: the package imports every
    file there (no list to extend), and each registers at least one kind."""
    import sys
    from pathlib import Path

    import moe_lora.recipes.kinds as package

    files = sorted(p.stem for p in Path(package.__file__).parent.glob("*.py") if p.stem != "__init__")
    assert {"facts", "p3", "sources", "world"} <= set(files)
    for stem in files:
        module = sys.modules[f"moe_lora.recipes.kinds.{stem}"]
        registered = [v for v in vars(module).values() if isinstance(v, DataKind)]
        assert registered and all(DATA_KINDS.get(k.name) is k for k in registered), stem
