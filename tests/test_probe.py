"""layout-from-probe: per-layer router statistics by hand, and a probe run's layout that spends the
probe's budget and trains."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lora.recipes.probe import pl_alpha_hill
from moe_lora.report.telemetry import statistic


def test_statistics_by_hand() -> None:
    row = {"importance": [1.0, 1.0, 2.0], "entropy": 0.5}
    h = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    assert statistic(row, "usage") == pytest.approx(math.exp(h))
    assert statistic(row, "mi") == pytest.approx(h - 0.5)
    assert statistic(row, "entropy") == 0.5
    assert statistic({"importance": [1.0, 1.0], "entropy": 1.0}, "mi") == 0.0  # clipped at zero


def test_pl_alpha_hill_by_hand() -> None:
    """W = U diag(s) V^T with chosen singular values: the eigenvalues of W^T W are s^2, and alpha is
    1 + m / sum ln(lambda_i / median) over the m eigenvalues from the median up."""
    s = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 5.0], dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    v, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    tail = [2.0**2, 3.0**2, 5.0**2]  # from the median (index 3 of 6) up
    expected = 1 + 3 / sum(math.log(x / tail[0]) for x in tail)
    assert pl_alpha_hill(u @ torch.diag(s) @ v.T) == pytest.approx(expected, rel=1e-5)
    heavier = torch.tensor([0.5, 1.0, 1.5, 2.0, 6.0, 20.0], dtype=torch.float64)
    assert pl_alpha_hill(u @ torch.diag(heavier) @ v.T) < expected  # a heavier tail: a smaller exponent


def test_a_probe_runs_layout_spends_its_budget_and_trains(run_cli, tmp_path) -> None:
    probe = tmp_path / "probe"
    code, out, err = run_cli("train", "adapter=mola", "adapter.num_experts=4", f"hydra.run.dir={probe}")
    assert code == 0, out + err
    for rule in ("usage", "mi", "entropy", "alpha"):
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
