"""Budget-first layouts: named depth profiles reproduce MoLA's lists at any depth, every projection
spends its budget exactly within its bounds, and a misfit is one line naming the key."""

from __future__ import annotations

import random
import re

import pytest

from moe_lora.config import BudgetConfig, LayoutConfig
from moe_lora.errors import ConfigError
from moe_lora.model.layouts import budget_experts, project, resolve_layout
from moe_lora.recipes.compose import load_config

MOLA = {
    "triangle": [8, 6, 4, 2],
    "inverted_triangle": [2, 4, 6, 8],
    "hourglass": [8, 2, 2, 8],
    "rectangle": [5, 5, 5, 5],
    "diamond": [2, 8, 8, 2],
}


@pytest.fixture(scope="module")
def mola():
    """MoLA at the paper's budget: 5 experts per layer on average (160 over 32 layers), which every
    layout spends by default (the adapter's num_experts per layer)."""
    return load_config(["adapter=mola", "adapter.num_experts=5"], check_files=False).adapter


@pytest.mark.parametrize("name", sorted(MOLA))
def test_named_profiles_are_mola_lists_at_4_and_32_layers(mola, name) -> None:
    layout = load_config([f"layout={name}"], check_files=False).layout
    assert budget_experts(layout, mola, 4) == MOLA[name]
    assert budget_experts(layout, mola, 32) == [e for e in MOLA[name] for _ in range(8)]  # 160 experts


@pytest.mark.parametrize("num_layers", [22, 28])
def test_random_profiles_spend_the_budget_exactly(mola, num_layers) -> None:
    rng = random.Random(num_layers)
    for _ in range(200):
        weights = [rng.random() ** 3 for _ in range(rng.choice([1, 2, num_layers // 2, num_layers]))]
        lo, hi = rng.randint(1, 3), rng.randint(4, 12)
        total = rng.randint(lo * num_layers, hi * num_layers)
        counts = project([weights[i * len(weights) // num_layers] for i in range(num_layers)], total, lo, hi)
        assert sum(counts) == total and min(counts) >= lo and max(counts) <= hi
    for name in MOLA:
        layout = LayoutConfig(name=name, profile=name, budget=BudgetConfig(per_layer_mean=5))
        assert sum(budget_experts(layout, mola, num_layers)) == 5 * num_layers
        by_layer = LayoutConfig(name=name, profile=name, budget=BudgetConfig(total=101), granularity="layer")
        counts = budget_experts(by_layer, mola, num_layers)
        assert sum(counts) == 101 and min(counts) >= mola.top_k


def test_larger_weights_get_more_experts_and_bounds_are_water_filled() -> None:
    counts = project([1, 1, 1, 10], 20, 2, 8)
    assert counts == [4, 4, 4, 8]  # the heavy layer capped at 8; the rest spread evenly over the others
    assert project([0, 0, 0, 1], 8, 1, 8) == [1, 1, 1, 5]


def test_uniform_and_a_named_shape_spend_the_same_by_default(run_cli) -> None:
    """One default budget for every layout (the adapter's num_experts per layer): a layout sweep
    compares at equal cost unless it says otherwise."""
    seen = {}
    for layout in ("uniform", "triangle"):
        code, out, err = run_cli("params", "model=llama2_7b", "adapter=mola", f"layout={layout}", tiny=False)
        assert code == 0, err
        per_layer, total = _experts(out)
        slots = re.search(r"expert slots over adapted linears: ([\d,]+)", out).group(1)
        trainable = next(line for line in out.splitlines() if line.startswith("trainable:"))
        seen[layout] = (per_layer, total, slots, trainable)
    assert seen["uniform"][0] == [8] * 32 and seen["triangle"][0] != seen["uniform"][0]
    assert seen["uniform"][1:] == seen["triangle"][1:] == (256, "1,792", seen["uniform"][3])


@pytest.mark.parametrize(
    ("layout", "key"),
    [
        (LayoutConfig(name="x", profile="triangle", budget=BudgetConfig(total=3)), "layout='x'"),
        (
            LayoutConfig(name="x", profile="triangle", budget=BudgetConfig(per_layer_mean=2.5)),
            "layout.budget.per_layer_mean",
        ),
        (LayoutConfig(name="x", weights=[1, 2], max_experts=2, budget=BudgetConfig(total=30)), "layout='x'"),
    ],
)
def test_infeasible_budgets_are_one_line_naming_the_key(mola, layout, key) -> None:
    with pytest.raises(ConfigError, match=f"^{key}") as err:
        resolve_layout(layout, mola, 4 if "2.5" not in str(layout.budget) else 3)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"profile": "pyramid"}, "layout.profile"),
        ({"profile": "triangle", "weights": [1.0]}, "layout.weights"),
        ({"profile": "triangle", "experts": [2, 2]}, "layout.experts"),
        ({"weights": [0.0, 0.0]}, "layout.weights"),
        ({"granularity": "block"}, "layout.granularity"),
    ],
)
def test_layout_config_errors_name_the_key(kwargs, key) -> None:
    with pytest.raises(ConfigError, match=f"^{key}="):
        LayoutConfig(name="x", **kwargs)


def test_slope_and_curvature_are_the_named_shapes_as_points(mola) -> None:
    searched = load_config(["layout=searched"], check_files=False).layout
    assert budget_experts(searched, mola, 4) == [5, 5, 5, 5]  # (0, 0): the rectangle
    for name, (a, b) in {"triangle": (-0.8, 0.0), "hourglass": (0.0, 2.4), "diamond": (0.0, -2.4)}.items():
        point = load_config(["layout=searched", f"layout.slope={a}", f"layout.curvature={b}"], check_files=False)
        assert budget_experts(point.layout, mola, 32) == [e for e in MOLA[name] for _ in range(8)], name


def test_a_list_of_objectives_is_returned_as_a_tuple() -> None:
    from moe_lora.recipes.job import objective_value

    results = {"metrics": {"a": 0.5, "b": 2}, "params": {"trainable": 10}}
    assert objective_value(results, "metrics.a") == 0.5
    assert objective_value(results, ["metrics.a", "params.trainable"]) == (0.5, 10.0)
    assert objective_value(results, ["metrics.a", "metrics.missing"]) is None


def test_search_confirm_writes_layouts_and_a_preset_of_claims(tmp_path) -> None:
    import json

    from moe_lora.recipes.search_confirm import main as confirm

    sweep = tmp_path / "layout_search" / "study"
    for i, (slope, curv, em) in enumerate([(0.5, -1.0, 0.40), (-0.3, 2.0, 0.70), (0.9, 0.0, 0.55)]):
        (sweep / str(i)).mkdir(parents=True)
        config = {
            "layout": {
                "name": "searched",
                "slope": slope,
                "curvature": curv,
                "budget": {"per_layer_mean": 5.0},
                "granularity": "group",
                "groups": 4,
            },
            "recipe": {"objective": "metrics.instruction_em", "objectives": []},
            "adapter": {"num_experts": 5},
        }
        (sweep / str(i) / "results.json").write_text(json.dumps({"config": config, "metrics": {"instruction_em": em}}))
    conf = tmp_path / "conf"
    assert confirm([str(sweep), "--top", "2", "--conf-dir", str(conf)]) == 0
    search = [f"hydra.searchpath=[file://{conf}]"]
    top1 = load_config(["layout=layout_search_top1", *search], check_files=False).layout
    assert (top1.slope, top1.curvature, top1.budget.per_layer_mean) == (-0.3, 2.0, 5.0)  # the best trial
    preset = load_config(["experiment=layout_search_confirm", "layout=layout_search_top2", *search], check_files=False)
    assert preset.layout.slope == 0.9 and preset.recipe.max_steps == 400
    names = {c.name for c in preset.claims}
    assert "layout_search_top1_beats_hourglass" in names and len(names) == 2 * 6  # 5 named shapes + uniform
    assert {c.family for c in preset.claims} == {
        "layout_search_top1_beats_every_layout",
        "layout_search_top2_beats_every_layout",
    }
    with pytest.raises(ConfigError, match="exists"):
        confirm([str(sweep), "--conf-dir", str(conf)])
    free = tmp_path / "free" / "study"  # a trial of the free per-group space keeps its weights
    (free / "0").mkdir(parents=True)
    config = {**config, "layout": {**config["layout"], "slope": None, "curvature": None, "weights": [0.1, 1, 0.5, 0.2]}}
    (free / "0" / "results.json").write_text(json.dumps({"config": config, "metrics": {"instruction_em": 0.5}}))
    assert confirm([str(free), "--top", "1", "--conf-dir", str(conf), "--preset", "mine", "--with", "triangle"]) == 0
    mine = load_config(["experiment=mine", "layout=free_top1", *search], check_files=False)
    assert mine.layout.weights == [0.1, 1, 0.5, 0.2] and mine.layout.slope is None
    assert "triangle_beats_uniform" in {c.name for c in mine.claims}


def test_multirun_precheck_keeps_the_search_path(tmp_path) -> None:
    """Generated layouts and presets (search-confirm, layout-from-probe) live outside conf/: the
    precheck of every sweep job must compose with the command line's hydra.searchpath."""
    from moe_lora.recipes.compose import expand_sweeps, precheck

    (tmp_path / "layout").mkdir()
    (tmp_path / "layout" / "mine.yaml").write_text(
        "defaults:\n  - /schema/layout/base@_here_\n  - _self_\nname: mine\nexperts: [3, 7, 5, 5]\n"
    )
    search = f"hydra.searchpath=[file://{tmp_path}]"
    jobs = expand_sweeps(["adapter=mola", "layout=mine,triangle", search, "hydra.sweep.dir=/x"])
    assert jobs == [["adapter=mola", "layout=mine", search], ["adapter=mola", "layout=triangle", search]]
    assert precheck(["adapter=mola", "layout=mine,triangle", search], multirun=True).layout.experts == [3, 7, 5, 5]


# ------------------------------------------------------------------ uniform spends a given budget
def test_even_experts_spreads_the_remainder_over_the_depth() -> None:
    from moe_lora.model.layouts import even_experts

    counts = even_experts(113, 22)
    assert sum(counts) == 113 and [i for i, c in enumerate(counts) if c == 6] == [3, 11, 18]
    assert set(counts) == {5, 6}
    assert even_experts(113, 28) == [4] * 14 + [5] + [4] * 13
    assert even_experts(88, 22) == [4] * 22


def _experts(out: str) -> tuple[list[int], int]:
    """The per-layer experts of the q_proj rows of `moe-lora params`, and its experts line's total."""
    rows = re.findall(r"model\.layers\.(\d+)\.self_attn\.q_proj\s+\d+\s+(\d+)\s", out)
    total = int(re.search(r"^experts: (\d+) over", out, re.MULTILINE).group(1))
    return [int(e) for _, e in sorted(rows, key=lambda r: int(r[0]))], total


@pytest.mark.parametrize(("layers", "shape"), [(22, "triangle"), (28, "inverted_triangle")])
def test_uniform_and_named_shapes_spend_a_given_total_exactly(run_cli, layers, shape) -> None:
    """The issue's command (uniform once counted 8 per layer, 176 slots at 22 layers), and a named
    shape: the total given on the command line replaces the default (8 per layer) for both."""
    seen = {}
    for layout in ("uniform", shape):
        args = ["model=llama2_7b", f"model.num_layers={layers}", "adapter=mola", f"layout={layout}"]
        code, out, err = run_cli("params", *args, "layout.budget.total=113", tiny=False)
        assert code == 0, err
        per_layer, total = _experts(out)
        assert len(per_layer) == layers and sum(per_layer) == total == 113
        seen[layout] = (per_layer, next(line for line in out.splitlines() if line.startswith("trainable:")))
    assert max(seen["uniform"][0]) - min(seen["uniform"][0]) == 1  # as even as integers allow
    assert seen["uniform"][1] == seen[shape][1]  # same budget, same trainable count


@pytest.mark.slow  # composes every layout preset with and without a budget: ~9 s
def test_every_layout_preset_spends_a_command_line_total(mola) -> None:
    """At 22 and 28 layers; each config is composed once and resolved at both depths."""
    from moe_lora.recipes.compose import CONF_DIR

    presets = [p.stem for p in sorted((CONF_DIR / "layout").glob("*.yaml")) if p.stem != "custom"]
    # custom: an explicit list; a budget beside it is refused (below), without one it spends what it lists
    for stem in presets:
        cfg = load_config([f"layout={stem}", "adapter=mola", "layout.budget.total=113"], check_files=False)
        assert cfg.layout.budget.per_layer_mean is None, stem
        for layers in (22, 28):
            assert sum(p.num_experts for p in resolve_layout(cfg.layout, cfg.adapter, layers)) == 113, (stem, layers)
    mean = load_config(["layout=triangle", "adapter=mola", "layout.budget.per_layer_mean=3"], check_files=False)
    assert (mean.layout.budget.total, mean.layout.budget.per_layer_mean) == (None, 3.0)
    for adapter in ("mola", "loramoe", "hydralora"):  # no budget: every layout spends uniform's, E per layer
        for stem in presets:
            cfg = load_config([f"layout={stem}", f"adapter={adapter}"], check_files=False)
            assert cfg.layout.budget.per_layer_mean is None and cfg.layout.budget.total is None, stem
            for layers in (22, 28):
                spent = sum(p.num_experts for p in resolve_layout(cfg.layout, cfg.adapter, layers))
                assert spent == cfg.adapter.num_experts * layers, (adapter, stem, layers)
    with pytest.raises(ConfigError, match=r"^layout\.budget\.total=113 give total or per_layer_mean, not both"):
        load_config(["layout=triangle", "layout.budget.total=113", "layout.budget.per_layer_mean=3"], check_files=False)


@pytest.mark.parametrize(
    ("layout", "adapter", "match"),
    [
        (LayoutConfig(budget=BudgetConfig(total=10)), "mola", r"^layout='uniform': a budget of 10 experts over 22"),
        (LayoutConfig(budget=BudgetConfig(total=44)), "mola", None),  # 2 per layer: top-2 fits
        (LayoutConfig(budget=BudgetConfig(total=30)), "mola", r"1 to 2 per layer, outside \[2, 30\]"),  # top_k 2
        (LayoutConfig(name="custom", experts=[4], budget=BudgetConfig(total=88)), "mola", r"^layout\.experts=\[4\]"),
        (LayoutConfig(budget=BudgetConfig(total=88)), "lora", r"adapter='lora' has no num_experts"),
    ],
)
def test_uniform_refuses_a_budget_it_cannot_spend_in_one_line(layout, adapter, match) -> None:
    cfg = load_config([f"adapter={adapter}"], check_files=False).adapter
    if match is None:
        assert [p.num_experts for p in resolve_layout(layout, cfg, 22)] == [2] * 22
        return
    with pytest.raises(ConfigError, match=match) as err:
        resolve_layout(layout, cfg, 22)
    assert "\n" not in str(err.value)
