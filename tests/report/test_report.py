"""`moe-lora report` on small fabricated results folders: values checked, not just existence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_lora.report.build import build_report
from moe_lora.report.collect import collect
from moe_lora.report.tables import aggregate


def fake_run(
    path: Path,
    adapter: str,
    seed: int,
    cbqa: float,
    instr: float,
    cv: float,
    layout: str = "uniform",
    label: str | None = None,
    config: dict | None = None,
    routers: int | None = None,
) -> None:
    """A finished run folder; ``config`` adds keys to results.json["config"] (claims, recipe...);
    ``routers``: trainable router parameters (absent from params when None, as in older results)."""
    path.mkdir(parents=True)
    routing = {
        f"model.layers.{i}.mlp.up_proj": {
            "cv": cv,
            "load": [3, 1],
            "by_task_type": {"cbqa": {"load": [3, 1]}, "instruction": {"load": [1, 3]}},
        }
        for i in range(2)
    }
    results = {
        "adapter": adapter,
        "layout": layout,
        "seed": seed,
        "wall_s": 10.0 + seed,
        "params": {"trainable": 1000, **({} if routers is None else {"routers": routers})},
        "config": {"label": label, **(config or {})},
        "metrics": {
            "cbqa_em": cbqa,
            "cbqa_em_base": 0.9,
            "cbqa_candidate_acc": cbqa,
            "knowledge_retained": cbqa / 0.9,
            "instruction_em": instr,
        },
        "routing": routing,
    }
    (path / "results.json").write_text(json.dumps(results))
    rows = [{"step": s, "module": m, "task_type": "all", "cv": cv * s / 10} for s in (5, 10) for m in routing]
    (path / "routing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def sweep(tmp_path) -> Path:
    fake_run(tmp_path / "0", "lora", 0, 0.6, 0.5, 0.0, routers=0)
    fake_run(tmp_path / "1", "lora", 1, 0.8, 0.7, 0.0, routers=0)
    fake_run(tmp_path / "2", "loramoe", 0, 0.9, 0.4, 0.2, label="loramoe+lbc", routers=200)
    fake_run(tmp_path / "3", "mola", 0, 0.5, 0.5, 0.4, layout="triangle")
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "failure.json").write_text(json.dumps({"error": "RuntimeError: boom"}))
    return tmp_path


def test_aggregate_mean_and_std_over_seeds(sweep) -> None:
    rows = {r["label"]: r for r in aggregate(collect([sweep]))}
    assert set(rows) == {"lora", "loramoe+lbc", "mola/triangle"}
    lora = rows["lora"]
    assert lora["n"] == 2 and lora["seeds"] == [0, 1]
    assert lora["CBQA EM"] == pytest.approx((0.7, 0.1414213562), rel=1e-6)  # mean, sample std
    assert lora["instruction EM"][0] == pytest.approx(0.6)
    assert rows["loramoe+lbc"]["routing CV"] == (pytest.approx(0.2), 0.0)
    assert rows["lora"]["wall s"][0] == pytest.approx(10.5)


def test_report_folder_tables_plots_and_failures(sweep) -> None:
    out = build_report([sweep])
    assert out == sweep / "report"
    md = (out / "results.md").read_text()
    assert "| lora | 2 | 1,000 | 1,000 | - | - | 0.700 ± 0.141 |" in md  # no budget in these results files
    assert "| loramoe+lbc | 1 | 1,000 | 800 | - | - | 0.900 ± 0.000 |" in md  # without the routers' 200
    assert "| mola/triangle | 1 | 1,000 | - |" in md  # results without a router count
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0].startswith("variant,seeds,trainable_params,trainable_params_without_routers,CBQA_EM_mean,CBQA_EM_std")
    assert csv[1].startswith("lora,2,1000,1000,0.7")
    index = (out / "index.md").read_text()
    assert "4 finished runs, 1 failed" in index and "RuntimeError: boom" in index
    for png in (
        "cv_over_training.png",
        "knowledge_vs_instruction.png",
        "comparison.png",
        "expert_load_loramoe_lbc.png",
    ):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in index
    assert "\\begin{tabular}" in (out / "results.tex").read_text()


def test_report_replaces_only_its_own_folder(sweep, tmp_path) -> None:
    out = tmp_path / "elsewhere" / "rep"
    build_report([sweep], out)
    (out / "stale.txt").write_text("old")
    (out.parent / "keep.txt").write_text("mine")
    build_report([sweep], out)
    assert not (out / "stale.txt").exists() and (out.parent / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.parent.iterdir()) == ["keep.txt", "rep"]  # no temporary leftovers


def test_report_without_runs_is_an_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no moe-lora runs"):
        build_report([tmp_path])


def test_rows_split_by_settings_that_vary_within_a_label(tmp_path) -> None:
    for i, (steps, seed, em) in enumerate([(150, 0, 0.9), (150, 1, 0.8), (450, 0, 0.5), (450, 1, 0.7)]):
        fake_run(tmp_path / str(i), "lora", seed, em, 0.1, 0.0)
        res = json.loads((tmp_path / str(i) / "results.json").read_text())
        res["config"] = {"label": "lora", "seed": seed, "recipe": {"max_steps": steps}}
        (tmp_path / str(i) / "results.json").write_text(json.dumps(res))
    rows = {r["label"]: r for r in aggregate(collect([tmp_path]))}
    assert set(rows) == {"lora (max_steps=150)", "lora (max_steps=450)"}  # the varied key, short
    assert rows["lora (max_steps=450)"]["CBQA EM"][0] == pytest.approx(0.6)
    assert rows["lora (max_steps=150)"]["n"] == 2


def test_asymmetry_of_per_task_loras(tmp_path) -> None:
    """Same A for every task, orthogonal B per task: cos(A) = 1, cos(B) = 0; init subtracted."""
    import numpy as np
    from safetensors.numpy import save_file

    a = np.arange(1, 7, dtype=np.float32).reshape(3, 2)
    for i, task in enumerate(["reverse", "sort"]):
        run = tmp_path / task
        fake_run(run, "lora", 0, 0.5, 0.5, 0.0)
        res = json.loads((run / "results.json").read_text())
        res["config"] = {"data": {"instruction_tasks": [task]}}
        (run / "results.json").write_text(json.dumps(res))
        b = np.zeros((2, 4), dtype=np.float32)
        b[0, i] = 1.0
        save_file({"m.lora_A": a + i, "m.lora_B": b}, str(run / "adapter_model.safetensors"))
        save_file(
            {"m.lora_A": np.full_like(a, float(i)), "m.lora_B": np.zeros_like(b)}, str(run / "adapter_init.safetensors")
        )
    out = build_report([tmp_path])
    table = (out / "asymmetry.md").read_text()
    assert "| 0 | change since init | reverse, sort | 1.000 | 0.000 |" in table
    raw_cos = float((a.ravel() @ (a + 1).ravel()) / (np.linalg.norm(a) * np.linalg.norm(a + 1)))
    assert f"| 0 | raw | reverse, sort | {raw_cos:.3f} | 0.000 |" in table
    assert "A/B asymmetry" in (out / "index.md").read_text()


def test_report_over_runs_of_two_models(tmp_path) -> None:
    """Runs whose whole model config differs: the row names the model, file names stay short."""
    for i, (model, path) in enumerate([("gpt2", "/ckpt/" + "g" * 120), ("qwen2_5_0_5b", "/ckpt/" + "q" * 120)]):
        fake_run(tmp_path / str(i), "loramoe", 0, 0.5, 0.5, 0.1)
        res = json.loads((tmp_path / str(i) / "results.json").read_text())
        res["config"] = {
            "label": None,
            "model": {
                "name": model,
                "name_or_path": path,
                "hidden_size": 64 + i,
                "modules": {"ffn": [f"mlp.{'x' * 80}{i}"]},
            },
        }
        (tmp_path / str(i) / "results.json").write_text(json.dumps(res))
    out = build_report([tmp_path])
    labels = {r["label"] for r in aggregate(collect([tmp_path]))}
    assert labels == {"loramoe (model=gpt2)", "loramoe (model=qwen2_5_0_5b)"}
    assert all(len(p.name) < 100 for p in out.iterdir())


def test_rows_show_real_experts_per_token_and_null_rate(tmp_path) -> None:
    """AdaMoE's statistics reach the table: mean over modules, then mean ± std over seeds."""
    for seed, (real, null) in enumerate([(3.0, 0.25), (2.0, 0.5)]):
        fake_run(tmp_path / str(seed), "adamoe", seed, 0.9, 0.5, 0.1)
        res = json.loads((tmp_path / str(seed) / "results.json").read_text())
        for i, stats in enumerate(res["routing"].values()):
            stats |= {"real_experts_per_token": real + i, "null_rate": null}  # modules differ by 1
        (tmp_path / str(seed) / "results.json").write_text(json.dumps(res))
    row = aggregate(collect([tmp_path]))[0]
    assert row["real experts/token"] == (pytest.approx(3.0), pytest.approx(0.7071067811865476))
    assert row["null rate"][0] == pytest.approx(0.375)
    assert "| real experts/token | null rate |" in build_report([tmp_path]).joinpath("results.md").read_text()
