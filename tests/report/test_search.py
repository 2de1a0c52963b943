"""The layout section of a report: allocations from results.json, the Pareto set by hand, plots."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert "| t3 | searched | 0.10 | - | 5 | 5,5,5,5 | 1,000 | 0.790 | 0.590 |  |" in md
    assert "| t0 | triangle | 0.10 | - | 5 | 8,6,4,2 | 1,000 | 0.800 | 0.600 | yes |" in md
    for png in ("pareto.png", "allocation_heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in (out / "index.md").read_text()
