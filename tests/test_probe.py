"""layout-from-probe: per-layer router statistics by hand, and a probe run's layout that spends the
probe's budget and trains."""

from __future__ import annotations

import math

import pytest

from moe_lora.probe import statistic


def test_statistics_by_hand() -> None:
    row = {"importance": [1.0, 1.0, 2.0], "entropy": 0.5}
    h = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    assert statistic(row, "usage") == pytest.approx(math.exp(h))
    assert statistic(row, "mi") == pytest.approx(h - 0.5)
    assert statistic(row, "entropy") == 0.5
    assert statistic({"importance": [1.0, 1.0], "entropy": 1.0}, "mi") == 0.0  # clipped at zero


def test_a_probe_runs_layout_spends_its_budget_and_trains(run_cli, tmp_path) -> None:
    probe = tmp_path / "probe"
    code, out, err = run_cli("train", "adapter=mola", "adapter.num_experts=4", f"hydra.run.dir={probe}")
    assert code == 0, out + err
    for rule in ("usage", "mi", "entropy"):
        layout = tmp_path / "conf" / "layout" / f"from_{rule}.yaml"
        code, out, err = run_cli(
            "layout-from-probe",
            str(probe),
            "--rule",
            rule,
            "--out",
            str(layout),
            "--name",
            f"from_{rule}",
            "--max",
            "8",
            tiny=False,
        )
        assert code == 0, out + err
        experts = [int(x) for x in layout.read_text().split("experts: [")[1].split("]")[0].split(",")]
        assert sum(experts) == 4 * 2 and all(2 <= e <= 8 for e in experts)  # the probe's 2 layers x 4; >= top_k
        assert "# Written by `moe-lora layout-from-probe" in layout.read_text()
    code, out, err = run_cli(
        "train",
        "adapter=mola",
        "layout=from_mi",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "recipe.max_steps=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert code == 0, out + err
    code, out, err = run_cli("layout-from-probe", str(probe), "--out", str(layout), tiny=False)
    assert code != 0 and "exists" in out + err  # an earlier layout is never replaced silently
