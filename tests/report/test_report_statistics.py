"""The statistics the presets exist for, on fabricated run folders with hand-computed values:
expert-group share and CV by task type (LoRAMoE), real experts per token over training (AdaMoE),
parameters without routers, ALoRA's final ranks per layer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from moe_lora.report import ranks
from moe_lora.report.build import build_report
from moe_lora.report.collect import collect
from moe_lora.report.routing_stats import has_expert_groups, knowledge_share, over_training
from moe_lora.report.tables import aggregate, row_labels

MODULES = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
LORAMOE = {"name": "loramoe", "top_k": None, "num_null_experts": 0, "lbc_expert_types": None}


def write_run(
    path: Path,
    label: str,
    seed: int,
    adapter_config: dict,
    final: dict[str, dict],
    rows: Sequence[dict] = (),
    params: dict | None = None,
    adapter_report: dict | None = None,
) -> None:
    """A finished run: ``final`` = module -> final window ({"all" stats, "by_task_type": ...})."""
    path.mkdir(parents=True)
    results = {
        "adapter": adapter_config["name"],
        "layout": "uniform",
        "seed": seed,
        "wall_s": 1.0,
        "params": params or {"trainable": 1000, "routers": 0},
        "config": {"label": label},
        "adapter_config": adapter_config,
        "routing": final,
        "metrics": {"cbqa_em": 0.5, "knowledge_retained": 0.5, "instruction_em": 0.5},
    }
    if adapter_report is not None:
        results["adapter_report"] = adapter_report
    (path / "results.json").write_text(json.dumps(results))
    (path / "routing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def window(cv: float, share0: float | None = None, real: float = 8.0, null: float = 0.0) -> dict:
    w = {"cv": cv, "load": [1, 1], "real_experts_per_token": real, "null_rate": null}
    return w | ({"group_share": [share0, 1 - share0]} if share0 is not None else {})


# Per seed, per module: (CV@cbqa, knowledge share@cbqa, CV@instruction, knowledge share@instruction).
LORAMOE_FINAL = {0: [(0.1, 0.6, 0.5, 0.3), (0.3, 0.8, 0.7, 0.1)], 1: [(0.2, 0.5, 0.6, 0.4), (0.4, 0.7, 0.8, 0.2)]}


def loramoe_final(seed: int) -> dict[str, dict]:
    return {
        m: window(0.05, 0.5) | {"by_task_type": {"cbqa": window(c, g), "instruction": window(ci, gi)}}
        for m, (c, g, ci, gi) in zip(MODULES, LORAMOE_FINAL[seed], strict=True)
    }


@pytest.fixture
def loramoe_sweep(tmp_path: Path) -> Path:
    """LoRAMoE (expert groups) over two seeds, and a top-2 MoLA arm whose groups mean nothing."""
    for seed in (0, 1):
        rows = [
            {
                "step": step,
                "module": m,
                "task_type": t,
                "cv": 0.1,
                "real_experts_per_token": 8.0,
                "group_share": [g + 0.1 * seed + (0.0 if step == 10 else 0.2), 0.0],
            }
            for step in (10, 20)
            for m, g in zip(MODULES, (0.4, 0.6), strict=True)
            for t in ("cbqa", "all")
        ]
        write_run(
            tmp_path / f"lm{seed}",
            "loramoe",
            seed,
            LORAMOE,
            loramoe_final(seed),
            rows,
            params={"trainable": 1000, "routers": 64},
        )
    mola = {m: window(0.2, 0.5, real=2.0) | {"by_task_type": {"cbqa": window(0.9, 0.9, real=2.0)}} for m in MODULES}
    write_run(
        tmp_path / "mola",
        "mola",
        0,
        {"name": "mola", "top_k": 2, "num_null_experts": 0},
        mola,
        params={"trainable": 900, "routers": 32},
    )
    return tmp_path


def test_group_share_and_cv_by_task_type(loramoe_sweep: Path) -> None:
    """Mean over modules, then mean ± std over seeds: knowledge share of CBQA tokens (0.6+0.8)/2 = 0.7
    and (0.5+0.7)/2 = 0.6 -> 0.65 ± 0.0707; of instruction tokens 0.2 and 0.3 -> 0.25."""
    rows = {r["label"]: r for r in aggregate(collect([loramoe_sweep]))}
    lm = rows["loramoe"]
    assert lm["knowledge-group share@cbqa"] == (pytest.approx(0.65), pytest.approx(0.0707106781))
    assert lm["knowledge-group share@instruction"] == (pytest.approx(0.25), pytest.approx(0.0707106781))
    assert lm["CV@cbqa"] == (pytest.approx(0.25), pytest.approx(0.0707106781))  # (0.1+0.3)/2, (0.2+0.4)/2
    assert lm["CV@instruction"][0] == pytest.approx(0.65)  # (0.6 + 0.7) / 2
    assert lm["routing CV"] == (pytest.approx(0.05), 0.0)
    mola = rows["mola"]
    assert mola["CV@cbqa"] == (pytest.approx(0.9), 0.0) and mola["CV@instruction"] is None
    assert mola["knowledge-group share@cbqa"] is None  # groups are LoRAMoE's only


def test_routing_table_prints_dashes_where_a_statistic_does_not_apply(loramoe_sweep: Path) -> None:
    md = (build_report([loramoe_sweep]) / "results.md").read_text()
    assert (
        "| variant | routing CV | CV@cbqa | CV@instruction | real experts/token | null rate | "
        "knowledge-group share@cbqa | knowledge-group share@instruction |"
    ) in md
    assert (
        "| loramoe | 0.050 ± 0.000 | 0.250 ± 0.071 | 0.650 ± 0.071 | 8.000 ± 0.000 | 0.000 ± 0.000 | "
        "0.650 ± 0.071 | 0.250 ± 0.071 |"
    ) in md
    assert "| mola | 0.200 ± 0.000 | 0.900 ± 0.000 | - | 2.000 ± 0.000 | 0.000 ± 0.000 | - | - |" in md


def test_parameters_without_routers(loramoe_sweep: Path) -> None:
    out = build_report([loramoe_sweep])
    md = (out / "results.md").read_text()
    assert "| loramoe | 2 | 1,000 | 936 |" in md and "| mola | 1 | 900 | 868 |" in md
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[1].startswith("loramoe,2,1000,936,")


def test_group_share_over_training_series_and_plot(loramoe_sweep: Path) -> None:
    """Per step: mean over modules within a run, then over seeds. Step 10, cbqa: seed 0 (0.4+0.6)/2
    = 0.5, seed 1 0.6 -> 0.55; step 20 adds 0.2 -> 0.75. MoLA has no groups: no line."""
    runs = collect([loramoe_sweep])
    series = over_training(
        runs,
        row_labels(runs),
        lambda r: knowledge_share(r) if r["task_type"] != "all" else None,
        keep=has_expert_groups,
    )
    assert set(series) == {"loramoe"} and set(series["loramoe"]) == {"cbqa"}
    assert series["loramoe"]["cbqa"] == {10: pytest.approx(0.55), 20: pytest.approx(0.75)}
    out = build_report([loramoe_sweep])
    index = (out / "index.md").read_text()
    png = "group_share_over_training.png"
    assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in index
    assert not (out / "real_experts_over_training.png").exists()  # no arm has null experts


def test_real_experts_over_training(tmp_path: Path) -> None:
    """AdaMoE (null experts) against plain top-4: seed-averaged real experts per token per step."""
    arms = {
        "adamoe_null4": ({"name": "adamoe", "top_k": 4, "num_null_experts": 4}, (3.0, 2.0)),
        "topk_no_null": ({"name": "mola", "top_k": 4, "num_null_experts": 0}, (4.0, 4.0)),
    }
    for label, (cfg, (first, last)) in arms.items():
        for seed in (0, 1):
            rows = [
                {"step": s, "module": m, "task_type": "all", "real_experts_per_token": v + seed + i}
                for s, v in ((10, first), (20, last))
                for i, m in enumerate(MODULES)
            ]
            final = {m: window(0.1, real=last) for m in MODULES}
            write_run(tmp_path / f"{label}{seed}", label, seed, cfg, final, rows)
    runs = collect([tmp_path])
    series = over_training(runs, row_labels(runs), lambda r: r.get("real_experts_per_token"))
    # modules differ by 1 (mean +0.5), seeds by 1 (mean +0.5)
    assert series["adamoe_null4"]["all"] == {10: pytest.approx(4.0), 20: pytest.approx(3.0)}
    assert series["topk_no_null"]["all"] == {10: pytest.approx(5.0), 20: pytest.approx(5.0)}
    out = build_report([tmp_path])
    png = "real_experts_over_training.png"
    assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in (out / "index.md").read_text()
    assert not (out / "group_share_over_training.png").exists()  # no LoRAMoE arm


def test_alora_final_ranks_per_layer(tmp_path: Path) -> None:
    """Mean over seeds per linear; layer totals; the grand total is the budget (8 x 4 = 32)."""
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
    ]
    for seed, values in enumerate([(8, 6, 10, 8), (7, 6, 11, 8)]):
        write_run(
            tmp_path / f"alora{seed}",
            "alora",
            seed,
            {"name": "alora"},
            {},
            adapter_report={"alora_ranks": dict(zip(names, values, strict=True))},
        )
    write_run(tmp_path / "lora", "lora", 0, {"name": "lora"}, {})
    out = build_report([tmp_path])
    table = (out / "alora_ranks.md").read_text()
    assert "**alora** (32 active components in all)" in table and table.count("**") == 2  # no lora table
    assert "| layer | up_proj | q_proj | total |" in table
    assert "| 0 | 6 | 7.5 | 13.5 |" in table and "| 1 | 8 | 10.5 | 18.5 |" in table
    assert "ALoRA's final ranks per layer" in (out / "index.md").read_text()


def test_rank_columns_keep_names_that_would_collide() -> None:
    """GPT-2 has attn.c_proj and mlp.c_proj: cut to the last part, they would share a column."""
    md = ranks.markdown({"a": {"h.0.attn.c_attn": 8, "h.0.attn.c_proj": 8, "h.0.mlp.c_proj": 4, "lm_head": 2}})
    assert "| layer | c_attn | attn.c_proj | lm_head | mlp.c_proj | total |" in md
    assert "| 0 | 8 | 8 | - | 4 | 20 |" in md and "| - | - | - | 2 | - | 2 |" in md
