"""Every YAML file under conf/ composes and validates (torchtune's test_configs idea)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_lora.adapters import ADAPTERS
from moe_lora.recipes.compose import CONF_DIR, expand_sweeps, load_config
from tests.conftest import first_fast

GROUPS = ["model", "adapter", "layout", "data", "recipe", "logger"]
CASES = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "name"), CASES, ids=[f"{g}={n}" for g, n in CASES])
def test_every_yaml_composes_and_validates(group: str, name: str) -> None:
    text = (CONF_DIR / "data" / f"{name}.yaml").read_text() if group == "data" else ""
    # real datasets and real facts need a hub model's tokenizer (P3: an encoder-decoder's)
    real = "sources" in text or "facts:" in text
    extra = ["model=t5_v1_1_lm_adapt_large"] if "p3:" in text else ["model=gpt2"] if real else []
    if group == "model" and "\nmoe:" in (CONF_DIR / "model" / f"{name}.yaml").read_text():
        extra.append("adapter=lora")  # an MoE base: the default loramoe cannot adapt its fused experts (one line)
    cfg = load_config([f"{group}={name}", *extra], check_files=False)  # hub models are not downloaded here
    assert getattr(cfg, group).name == name


def test_every_registered_adapter_has_a_yaml() -> None:
    yamls = {p.stem for p in (CONF_DIR / "adapter").glob("*.yaml")}
    assert set(ADAPTERS) <= yamls


def test_schemas_are_not_group_choices() -> None:
    """Schemas live under schema/<group>, so `adapter=` lists only real variants."""
    assert not any(Path(CONF_DIR, "adapter").glob("*schema*"))
    cfg = load_config([])
    assert cfg.adapter.name == "loramoe" and cfg.model.name == "tiny_world"


PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("arm", sorted(p.stem for p in (CONF_DIR / "arm").glob("*.yaml")))
def test_every_arm_composes(arm: str) -> None:
    cfg = load_config([f"+arm={arm}"], check_files=False)
    assert cfg.label


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.endswith("_paper")])
def test_paper_presets_take_recipe_overrides(preset: str) -> None:
    """A paper preset selects conf/recipe/<name>_paper.yaml, so recipe=smoke really gives 6 steps."""
    paper = load_config([f"experiment={preset}"], check_files=False).recipe
    smoke = load_config([f"experiment={preset}", "recipe=smoke"], check_files=False).recipe
    assert paper.name.endswith("_paper") and paper.max_steps >= 1000
    assert (smoke.name, smoke.max_steps) == ("smoke", 6)


@pytest.mark.parametrize("nulls", [2, 4, 8])
def test_null_expert_arms_differ_from_their_baseline_only_in_null_experts(nulls: int) -> None:
    """experiment=adamoe compares topk_no_null with adamoe_null*: same adapter in every field but
    num_null_experts (dropout, load balance, rank, targets, top-k), same recipe."""
    import dataclasses

    base = load_config(["experiment=adamoe", "+arm=mola_top4"], check_files=False)
    arm = load_config(["experiment=adamoe", f"+arm=adamoe_null{nulls}"], check_files=False)
    assert (base.label, arm.label) == ("topk_no_null", f"adamoe_null{nulls}")
    assert dataclasses.replace(base.adapter, num_null_experts=nulls) == arm.adapter
    assert base.recipe == arm.recipe


# presets that search (an Optuna study) rather than compare arms declare no claims
SEARCHES = {
    p for p in PRESETS if "override /hydra/sweeper: optuna" in (CONF_DIR / "experiment" / f"{p}.yaml").read_text()
}
CLAIM_PRESETS = [p for p in PRESETS if p not in SEARCHES]
# claims of a toy preset its paper twin cannot judge: it runs one step count, or lacks the arms
TOY_ONLY = {
    "loramoe_forgetting": {"lora_forgetting_grows_with_steps"},
    "mola_layouts": {"inverted_triangle_beats_diamond", "inverted_triangle_beats_uniform"}
    | {f"diamond_beats_{o}" for o in ("triangle", "inverted_triangle", "hourglass", "rectangle", "uniform")},
    "mov_molora_t5": {"mov_10_beats_2"},  # the paper has no MoV-2: it compares 30 against 10 experts
}
TWINS = {"mov_molora_t0_paper": "mov_molora_t5"}  # paper preset -> toy twin, where the names differ
PAPER_ONLY = {"mov_molora_t0_paper": {"mov_30_beats_10"}}


@pytest.mark.parametrize("preset", [p for p in CLAIM_PRESETS if p.endswith("_paper")])
def test_paper_presets_declare_their_toy_twins_claims(preset: str) -> None:
    import yaml

    toy = TWINS.get(preset, preset.removesuffix("_paper"))
    names = {
        p: {c["name"] for c in yaml.safe_load((CONF_DIR / "experiment" / f"{p}.yaml").read_text())["claims"]}
        for p in (toy, preset)
    }
    assert names[preset] - PAPER_ONLY.get(preset, set()) == names[toy] - TOY_ONLY.get(toy, set())


def _sweep(preset: str) -> tuple[list[list[str]], list[str]]:
    """A preset's sweep: its jobs without the seed axis, and that axis's overrides (``seed=0`` ...)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}"], return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.get("params") or {})
    seeds = [job[0] for job in expand_sweeps([f"seed={params.pop('seed')}"])] if "seed" in params else []
    return expand_sweeps([f"{k}={v}" for k, v in params.items()]), seeds


@pytest.mark.parametrize("preset", first_fast(PRESETS))  # every preset in the whole suite
def test_every_preset_job_composes_and_claims_compare_arms_that_differ_only_where_declared(preset: str) -> None:
    """Every job a preset's sweep would launch composes and validates (paper-scale twins too), and
    every claim's two arms differ in no training setting the claim does not declare (`differs_in`):
    the report would warn about it on every seed pair. Each arm is composed at its first seed; the
    other seeds are that config with ``seed`` replaced (all a ``seed=`` override changes), validated."""
    from moe_lora.config import resolved_config
    from moe_lora.recipes.compose import compose, to_config
    from moe_lora.report import claims
    from moe_lora.report.collect import Run

    jobs, seeds = _sweep(preset)
    assert len(jobs) >= 1
    runs = []
    for job in jobs:
        first = compose([f"experiment={preset}", *job, *seeds[:1]])
        cfg = to_config(first, check_files=False)
        for seed in seeds[1:]:
            assert to_config(OmegaConf.merge(first, OmegaConf.from_dotlist([seed])), check_files=False).seed == int(
                seed.split("=")[1]
            )
        run = {"adapter": cfg.adapter.name, "layout": cfg.layout.name, "seed": 0, "config": resolved_config(cfg)}
        runs.append(Run(Path(), run))
    if preset not in CLAIM_PRESETS:
        return
    found, _ = claims.claims_in(runs)
    assert found
    for claim in found:
        a, b = claims._arm_runs(claim, runs)
        assert len(a) == len(b) == 1, claim["name"]
        assert claims.confounders(claim, [(0, a[0], b[0])]) == [], claim["name"]


def test_compositions_share_one_config_store_and_leave_its_schemas_alone() -> None:
    """moe_lora.config makes a deep copy of Hydra's ConfigStore the store itself (Hydra copied it on
    every compose): a composition still gets its own copy of each schema, so nothing leaks between two."""
    import copy

    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    assert copy.deepcopy(store) is store
    before = copy.deepcopy(store.load("schema/adapter/mola.yaml").node)
    first = load_config(["adapter=mola", "adapter.num_experts=3"], check_files=False)
    again = load_config(["adapter=mola"], check_files=False)
    assert (first.adapter.num_experts, again.adapter.num_experts) == (3, 8)
    assert store.load("schema/adapter/mola.yaml").node == before
