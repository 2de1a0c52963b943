"""The layout section of a report: allocations from results.json, the Pareto set by hand, plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from moe_lora.report import search
from moe_lora.report.build import build_report
from moe_lora.report.collect import collect
from tests.report.test_report import fake_run

RUNS = {  # name: (layout, experts per layer, trainable, knowledge, instruction)
    "t0": ("triangle", [8, 6, 4, 2], 1000, 0.80, 0.60),
    "t1": ("searched", [2, 4, 6, 8], 1000, 0.85, 0.55),
    "t2": ("searched", [3, 3, 3, 3], 600, 0.70, 0.40),
    "t3": ("searched", [5, 5, 5, 5], 1000, 0.79, 0.59),  # beaten by t0 on all three
}


def _runs(root: Path):
    for name, (layout, experts, trainable, knowledge, instr) in RUNS.items():
        path = root / name
        fake_run(
            path,
            "mola",
            0,
            knowledge * 0.9,
            instr,
            0.1,
            layout=layout,
            config={"layout": {"name": layout, "slope": 0.1, "curvature": None}},
        )
        res = json.loads((path / "results.json").read_text())
        res["params"]["trainable"] = trainable
        res["metrics"]["knowledge_retained"] = knowledge
        res["budget"] = {"experts_per_layer": experts, "expert_slots": 7 * sum(experts), "active_expert_rank": 0}
        (path / "results.json").write_text(json.dumps(res))
    return collect([root])


def test_pareto_set_by_hand(tmp_path) -> None:
    pts = search.points(_runs(tmp_path))
    assert {p.name for p in search.pareto_set(pts)} == {"t0", "t1", "t2"}
    assert search.is_comparison(pts) and not search.is_comparison(pts[:1])


def test_report_writes_search_md_and_both_plots(tmp_path) -> None:
    _runs(tmp_path / "runs")
    out = build_report([tmp_path / "runs"], tmp_path / "rep")
    md = (out / "search.md").read_text()
    assert "| t3 | search (runs) | 0.10 | - | 5 | 5,5,5,5 | 1,000 | 0.790 | 0.590 |  |" in md
    assert "| t0 | triangle | 0.10 | - | 5 | 8,6,4,2 | 1,000 | 0.800 | 0.600 | yes |" in md
    assert "### Hypervolume per method" in md
    for png in ("pareto.png", "allocation_heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in (out / "index.md").read_text()


def test_hypervolume_by_hand() -> None:
    assert search.hypervolume([(1.0, 2.0), (2.0, 1.0)], (0.0, 0.0)) == 3.0  # 2 + 2 - the 1x1 overlap
    assert search.hypervolume([(1.0, 1.0, 1.0)], (0.0, 0.0, 0.0)) == 1.0
    # a dominated point adds nothing; a point below the reference counts nothing
    assert search.hypervolume([(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (2.0, -1.0, 3.0)], (0.0, 0.0, 0.0)) == 1.0
    two = search.hypervolume([(2.0, 1.0, 1.0), (1.0, 2.0, 2.0)], (0.0, 0.0, 0.0))
    assert two == 2.0 + 4.0 - 1.0  # boxes 2x1x1 and 1x2x2 overlap in 1x1x1


def test_hypervolume_per_method_and_seed_aggregates(tmp_path) -> None:
    pts = search.points(_runs(tmp_path))
    hv = search.hypervolumes(pts)
    assert set(hv) == {"triangle", "search (" + tmp_path.name + ")"}
    assert hv["search (" + tmp_path.name + ")"] > hv["triangle"] > 0  # the search's runs reach more corners
    twice = [*pts, search.replace(pts[0], name="t0b", knowledge=0.6, seed=1)]
    agg = {p.layout: p for p in search.aggregate(twice) if p.layout == "triangle"}
    assert agg["triangle"].seeds == 2 and agg["triangle"].knowledge == 0.7
    assert agg["triangle"].knowledge_sd == statistics.stdev([0.8, 0.6])
    again = [*twice, search.replace(pts[0], name="t0c", knowledge=0.4, seed=1)]  # seed 1 twice: 0.5
    agg = {p.layout: p for p in search.aggregate(again) if p.layout == "triangle"}
    assert (agg["triangle"].seeds, agg["triangle"].runs) == (2, 3)
    assert agg["triangle"].knowledge == pytest.approx(0.65)  # (0.8 + (0.6 + 0.4) / 2) / 2
    assert agg["triangle"].knowledge_sd == pytest.approx(statistics.stdev([0.8, 0.5]))


def test_a_single_objective_study_reports_its_importances(tmp_path) -> None:
    import optuna

    root = tmp_path / "study"
    _runs(root)
    study = optuna.create_study(study_name="tpe", storage=f"sqlite:///{root}/study.db", direction="maximize")
    for x in (0.1, 0.4, 0.6, 0.9, 0.3, 0.7):
        study.enqueue_trial({"layout.slope": x, "layout.curvature": 1 - x})
        study.optimize(
            lambda t: t.suggest_float("layout.slope", 0, 1) * 0 + t.suggest_float("layout.curvature", 0, 1), n_trials=1
        )
    [st] = search.read_studies(collect([root]))
    assert st["name"] == "tpe" and st["states"] == {"complete": 6} and st["best"]["value"] == 0.9
    assert set(st["importances"]) == {"layout.slope", "layout.curvature"}
    md = search.study_markdown(st)
    assert "Parameter importances" in md and "| layout.curvature |" in md


def test_the_heatmap_draws_the_probe_statistics_of_uniform_runs(tmp_path) -> None:
    runs = _runs(tmp_path)
    rows = [
        {"step": 10, "task_type": "all", "module": f"model.layers.{layer}.mlp", "importance": imp, "entropy": 0.3}
        for layer, imp in enumerate([[1, 1], [1, 3], [1, 0], [2, 2]])
    ]
    runs[0].results["layout"] = "uniform"
    runs[0].routing = rows
    probe = search.probe_statistics(runs, 4)
    assert probe["usage"][0] == pytest.approx(2.0) and probe["usage"][2] == pytest.approx(1.0)
    assert probe["entropy"] == [0.3] * 4
    assert search.probe_statistics(runs, 5) == {}  # another depth: not this layout's probe
    assert search.allocation_heatmap(search.points(runs), tmp_path / "h.png", probe)
