"""A report that fits the sweep: sections by what varies, short labels, distinct-seed counts, loss
curves, parameter-gap warnings, a single run; on fabricated run folders (no training)."""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import pytest

from moe_lora.report import curves, search, sweep, tables
from moe_lora.report.build import build_report
from moe_lora.report.build import main as report_main
from moe_lora.report.collect import collect
from tests.report.test_report import fake_run

PNG = b"\x89PNG"


def run(
    path: Path,
    adapter: str,
    seed: int,
    cbqa: float = 0.5,
    *,
    layout: str = "uniform",
    experts: list[int] | None = None,
    trainable: int = 1000,
    config: dict | None = None,
    losses: list[float] | None = None,
    val: dict[int, float] | None = None,
    layers: int = 2,
) -> Path:
    """A finished run: results.json with a budget, routing rows, and metrics.jsonl with a loss line
    per logged step (steps 10, 20, ...), a perf line after each, and ``val`` losses on lines of
    their own."""
    fake_run(path, adapter, seed, cbqa, 0.4, 0.1, layout=layout, config={"seed": seed, **(config or {})})
    res = json.loads((path / "results.json").read_text())
    res["params"]["trainable"] = trainable
    res["budget"] = {"experts_per_layer": experts or [8] * layers, "expert_slots": 8, "active_expert_rank": 32}
    res["routing"] = {
        f"model.layers.{i}.mlp.up_proj": {"cv": 0.1, "load": [3, 1], "by_task_type": {"cbqa": {"load": [3, 1]}}}
        for i in range(layers)
    }
    (path / "results.json").write_text(json.dumps(res))
    rows = []
    for i, loss in enumerate(losses or []):
        rows += [{"step": 10 * (i + 1), "loss": loss, "aux_loss": 0.01, "lr": 1e-3}]
        rows += [{"step": 10 * (i + 1), "tokens_per_s": 100.0, "peak_mem_bytes": 0}]
    rows += [{"step": s, "val_loss": v} for s, v in (val or {}).items()]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_variant_sweep_has_no_layout_section_and_has_loss_curves(tmp_path) -> None:
    """LoRA against LoRAMoE, both `uniform`: different allocations, but no layout study."""
    for seed in (0, 1):
        run(tmp_path / f"lora{seed}", "lora", seed, experts=[1, 1], trainable=1000, losses=[3.0, 2.0])
        run(tmp_path / f"moe{seed}", "loramoe", seed, experts=[8, 8], trainable=1005, losses=[3.5, 1.5])
    runs = collect([tmp_path])
    assert sweep.what_varies(runs).names() == ["variants", "seeds"]
    out = build_report([tmp_path])
    index = (out / "index.md").read_text()
    assert "4 runs that vary in: variants, seeds." in index
    assert "Layouts" not in index and "hypervolume" not in index.lower()
    assert not any((out / f).exists() for f in ("search.md", "pareto.png", "allocation_heatmap.png"))
    assert (out / "loss_curves.png").read_bytes()[:4] == PNG and "](loss_curves.png)" in index
    assert "no run recorded a validation loss" in index
    assert "Warning" not in index  # 0.5% apart: within the tolerance
    assert "## Claims" in index and "## Results (mean ± std over distinct seeds)" in index


def test_a_layout_sweep_keeps_its_section_labelled_by_row(tmp_path) -> None:
    run(tmp_path / "u", "mola", 0, experts=[5, 5], trainable=1000)
    run(tmp_path / "t", "mola", 0, 0.6, experts=[8, 2], trainable=1200, layout="triangle")
    assert sweep.what_varies(collect([tmp_path])).layouts
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the Pareto plot and the heatmap lay out without warnings
        index = (build_report([tmp_path]) / "index.md").read_text()
    assert "## Layouts: allocation, cost and scores" in index
    assert "](allocation_heatmap.png)" in index and "](pareto.png)" in index
    pts = {p.label for p in search.points(collect([tmp_path]), tables.row_labels(collect([tmp_path])))}
    assert pts == {"mola [uniform]", "mola/triangle"}  # what the Pareto plot and the heatmap write beside each point


def test_loss_bands_mean_and_min_max_over_distinct_seeds(tmp_path) -> None:
    """Seed 0 twice (4, 6 -> 5), seed 1 once (2): mean 3.5, band 2 to 5; not three seeds."""
    run(tmp_path / "a", "lora", 0, losses=[4.0, 3.0], val={20: 2.5})
    run(tmp_path / "b", "lora", 0, losses=[6.0, 5.0])
    run(tmp_path / "c", "lora", 1, losses=[2.0, 1.0], val={20: 1.5})
    runs = collect([tmp_path])
    bands = curves.curves(runs, tables.row_labels(runs))
    assert bands["train"]["lora"] == {10: (3.5, 2.0, 5.0), 20: (2.5, 1.0, 4.0)}
    assert bands["validation"]["lora"] == {20: (2.0, 1.5, 2.5)}
    index = (build_report([tmp_path]) / "index.md").read_text()
    assert "### Loss curves (train and validation)" in index


def test_a_repeated_seed_is_one_seed_not_a_spread(tmp_path) -> None:
    run(tmp_path / "a", "lora", 0, 0.6)
    run(tmp_path / "b", "lora", 0, 0.8)
    run(tmp_path / "c", "loramoe", 0, 0.5)
    run(tmp_path / "d", "loramoe", 1, 0.7)
    rows = {r["label"]: r for r in tables.aggregate(collect([tmp_path]))}
    assert rows["lora"]["seeds"] == [0] and rows["lora"]["n"] == 2
    assert rows["lora"]["CBQA EM"] == (pytest.approx(0.7), 0.0)  # the two runs averaged: one seed, no spread
    assert rows["loramoe"]["CBQA EM"] == (pytest.approx(0.6), pytest.approx(0.1414213562))
    md = (build_report([tmp_path]) / "results.md").read_text()
    assert "| lora | 1 (2 runs of seed 0) | 1,000 |" in md and "| loramoe | 2 | 1,000 |" in md
    assert "averages them as one seed" in md
    csv = (tmp_path / "report" / "results.csv").read_text().splitlines()
    assert csv[0].endswith(",runs") and csv[1].startswith("lora,1,") and csv[1].endswith(",2")


def test_labels_name_the_varied_keys_only_rounded(tmp_path) -> None:
    settings = [
        {"recipe": {"lr": 1.234567891234e-4, "warmup_ratio": 0.03, "max_steps": 100}},
        {"recipe": {"lr": 3.0e-4, "warmup_ratio": 0.1, "max_steps": 100}},  # lr and warmup change together
        {"recipe": {"lr": 1.0001e-3, "warmup_ratio": 0.1, "max_steps": 100}},
        {"recipe": {"lr": 1.0002e-3, "warmup_ratio": 0.1, "max_steps": 100}},  # 3 digits would merge these
    ]
    for i, cfg in enumerate(settings):
        run(tmp_path / "r" / str(i), "lora", 0, config={"label": "lora+long name/v2", **cfg})
    labels = sorted(set(tables.row_labels(collect([tmp_path / "r"])).values()))
    assert labels == [
        "lora+long name/v2 (lr=0.000123457)",
        "lora+long name/v2 (lr=0.0003)",
        "lora+long name/v2 (lr=0.0010001)",
        "lora+long name/v2 (lr=0.0010002)",
    ]
    for i, experts in enumerate([[1, 2], [2, 1], list(range(30))]):
        run(tmp_path / "l" / str(i), "mola", 0, config={"layout": {"name": "custom", "experts": experts}})
    assert sorted(set(tables.row_labels(collect([tmp_path / "l"])).values())) == [
        "mola (experts=[1,2])",
        "mola (experts=[2,1])",
        "mola (experts=[30 items])",
    ]
    for i, experts in enumerate([list(range(12)), list(range(1, 13))]):  # "[12 items]" twice: shown in full
        run(tmp_path / "m" / str(i), "mola", 0, config={"layout": {"name": "custom", "experts": experts}})
    assert sorted(set(tables.row_labels(collect([tmp_path / "m"])).values())) == [
        "mola (experts=[0,1,2,3,4,5,6,7,8,9,10,11])",
        "mola (experts=[1,2,3,4,5,6,7,8,9,10,11,12])",
    ]
    out = build_report([tmp_path / "r"])
    assert all(re.fullmatch(r"[a-z0-9_.-]+", p.name) for p in out.glob("*.png"))
    assert (out / "expert_load_lora_long_name_v2_lr_0.0003.png").exists()


def test_a_parameter_gap_warns_above_its_table_and_once_on_stderr(tmp_path, caplog) -> None:
    run(tmp_path / "a", "lora", 0, trainable=1000)
    run(tmp_path / "b", "loramoe", 0, trainable=1050)
    with caplog.at_level(logging.WARNING):
        out = build_report([tmp_path])
    gap = [r.getMessage() for r in caplog.records if "trainable parameters differ" in r.getMessage()]
    assert gap == [
        "warning: results table: trainable parameters differ by 4.8% between rows (lora: 1,000, loramoe: 1,050); "
        "score differences may come from the budget: match it (rank, experts, layout budget) or read the table "
        "with that in mind"
    ]
    index = (out / "index.md").read_text()
    warning = index.index("> **Warning:** trainable parameters differ by 4.8%")
    assert warning < index.index("| variant | seeds |")  # the line sits above the table it is about


def test_models_vary_one_table_per_model_and_gaps_within_a_model(tmp_path, caplog) -> None:
    for i, (model, adapter, trainable) in enumerate(
        [("gpt2", "lora", 1000), ("gpt2", "loramoe", 1000), ("qwen", "lora", 5000), ("qwen", "loramoe", 9000)]
    ):
        run(tmp_path / str(i), adapter, 0, trainable=trainable, config={"model": {"name": model}})
    with caplog.at_level(logging.WARNING):
        index = (build_report([tmp_path]) / "index.md").read_text()
    assert "### Model gpt2" in index and "### Model qwen" in index
    warned = [r.getMessage() for r in caplog.records if "trainable parameters" in r.getMessage()]
    assert (
        len(warned) == 1 and "of model qwen" in warned[0]
    )  # gpt2's rows agree; 1,000 vs 9,000 across models is no gap


def test_steps_vary_scores_against_steps(tmp_path) -> None:
    for i, (steps, seed) in enumerate([(100, 0), (100, 1), (300, 0), (300, 1)]):
        run(tmp_path / str(i), "lora", seed, 0.5 + 0.1 * (steps == 300), config={"recipe": {"max_steps": steps}})
    runs = collect([tmp_path])
    assert sweep.what_varies(runs).names() == ["seeds", "steps"]
    assert tables.by_steps(runs)["lora"][300]["CBQA EM"] == (pytest.approx(0.6), 0.0)
    out = build_report([tmp_path])
    assert (out / "scores_vs_steps.png").read_bytes()[:4] == PNG
    assert "lora (max_steps=100)" in (out / "results.md").read_text()


def test_a_single_run_gives_its_curves_and_routing(tmp_path, capsys) -> None:
    one = run(tmp_path / "run", "loramoe", 0, losses=[3.0, 2.5, 2.0], layers=3)
    assert report_main([str(one)]) == 0
    assert capsys.readouterr().out.startswith(f"report: {one / 'report' / 'index.md'}")
    index = (one / "report" / "index.md").read_text()
    assert "One run: its scores, loss curves and routing." in index and f"Run folder: `{one}`" in index
    for png in ("loss_curves.png", "cv_over_training.png", "expert_load_loramoe.png"):
        assert (one / "report" / png).read_bytes()[:4] == PNG and f"]({png})" in index
    assert "## Claims" not in index and "comparison.png" not in index


def test_many_long_rows_and_deep_models_draw_without_warnings(tmp_path, capsys) -> None:
    """Five rows with long labels and 32 layers: no matplotlib warning (tight_layout, legends)."""
    for i in range(5):
        label = f"loramoe+lbc_{i}_" + "x" * 30
        run(tmp_path / str(i), "loramoe", 0, losses=[3.0 - i / 10, 2.0], layers=32, config={"label": label})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = build_report([tmp_path])
    assert capsys.readouterr().err == ""
    assert len(list(out.glob("expert_load_*.png"))) == 5


def test_a_search_draws_load_maps_of_its_named_layouts_and_a_few_trials(tmp_path) -> None:
    from moe_lora.report.build import MAX_LOAD_MAPS, load_map_rows

    run(tmp_path / "u", "mola", 0, layout="uniform")
    for k in range(MAX_LOAD_MAPS + 3):
        run(tmp_path / f"t{k}", "mola", 0, layout="searched", config={"layout": {"name": "searched", "slope": k / 10}})
    runs = collect([tmp_path])
    rows = tables.aggregate(runs)
    chosen = [r["label"] for r in load_map_rows(runs, rows, tables.row_labels(runs))]
    assert len(rows) == MAX_LOAD_MAPS + 4 and len(chosen) == MAX_LOAD_MAPS
    assert chosen[0] == "mola" and all(c.startswith("mola/searched (slope=") for c in chosen[1:])
