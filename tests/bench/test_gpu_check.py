"""`scripts/gpu_check.py --tiny`: every stage of the GPU check on the CPU (so it cannot rot where
there is no GPU); a failing stage is recorded, skips what needs it and makes the exit non-zero; the
resume comparison sees a difference; the presets' memory estimates are read from their headers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lora.checks import check_report, gpu_check, train_check
from moe_lora.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
STAGES = [
    "bench_0.5b",
    "bench_7b",
    "sweep_0.5b",
    "checkpoint",
    "train_reference",
    "train_killed",
    "train_resume",
    "fsdp_runner",
    "fsdp_one_rank",
    "memory_vs_presets",
    "moe_experts",
]


@pytest.mark.slow  # ~35 s on one thread: a dozen tiny trainings and benches, one subprocess kill
def test_tiny_check_passes_every_stage(tmp_path) -> None:
    out = tmp_path / "check"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in STAGES:  # progress: a start and an end line per stage
        assert f"[gpu-check] {name}: start" in proc.stdout and f"[gpu-check] {name}: ok" in proc.stdout
    res = json.loads((out / "gpu_check.json").read_text())
    assert list(res["stages"]) == STAGES and res["failures"] == [] and res["mode"] == "tiny"
    st = res["stages"]
    assert st["train_killed"]["returncode"] == -9 and st["train_killed"]["checkpoints_at_kill"] == ["step-4"]
    assert res["resume"]["bitwise"] and res["resume"]["adapter_bitwise"]  # CPU: the resumed end equals bitwise
    assert st["train_resume"]["final_loss"] == st["train_reference"]["final_loss"]
    assert (st["fsdp_runner"]["ranks"], st["fsdp_runner"]["strategy"]) == (2, "fsdp")
    assert st["fsdp_one_rank"]["parameters_are_dtensors"] and st["fsdp_one_rank"]["bitwise"]
    assert set(st["bench_7b"]["variants"]) == set(gpu_check.VARIANTS.split(","))
    assert st["bench_0.5b"]["grouped_over_dense"].keys() == {"mola"}
    assert Path(st["sweep_0.5b"]["plot"]).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert all(r["verdict"].startswith("not comparable") for r in st["memory_vs_presets"]["presets"])
    assert st["moe_experts"]["kernel"] == "csr" and st["moe_experts"]["expert_forwards"] > 0  # the GPU: grouped_mm
    md = (out / "gpu_check.md").read_text()
    assert all(f"| {name} | pass |" in md for name in STAGES)
    assert "- bitwise: yes" in md
    assert not (out / "work" / "model").exists()  # the random checkpoint is removed unless --keep-model


def test_a_failing_stage_is_recorded_and_fails_the_exit(tmp_path, capsys) -> None:
    check = gpu_check.Check(tmp_path, gpu_check.tiny_mode(1))

    def boom() -> dict:
        raise train_check.CheckFailure("the kernel said no")

    check.stage("works", lambda: {"value": 1})
    check.stage("boom", boom)
    check.stage("after", lambda: {}, needs=("boom",))
    assert gpu_check.finish(check) == 1
    printed = capsys.readouterr().out
    assert "[gpu-check] boom: FAILED: the kernel said no" in printed
    assert "gpu-check FAILED boom: the kernel said no" in printed
    assert "gpu-check FAILED after: skipped: needs boom" in printed
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["passed"] == ["works"] and len(res["failures"]) == 2
    assert "| boom | FAIL: the kernel said no |" in (tmp_path / "gpu_check.md").read_text()


def test_out_is_never_reused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="exists"):
        gpu_check.main(["--tiny", "--out", str(tmp_path)])


def _fake_run(path: Path, losses: list[float], em: float) -> Path:
    path.mkdir()
    lines = [json.dumps({"step": i + 1, "loss": x, "aux_loss": 0.1}) for i, x in enumerate(losses)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "results.json").write_text(json.dumps({"metrics": {"cbqa_em": em, "response_loss": losses[-1]}}))
    (path / "adapter_model.safetensors").write_bytes(repr(losses).encode())
    (path / "routing.jsonl").write_text("{}\n")
    return path


def test_compare_tells_bitwise_from_close_from_different(tmp_path) -> None:
    ref = _fake_run(tmp_path / "ref", [2.0, 1.5], 0.25)
    same = train_check.compare(_fake_run(tmp_path / "same", [2.0, 1.5], 0.25), ref)
    assert same["bitwise"] and same["within_tolerance"]
    close = train_check.compare(_fake_run(tmp_path / "close", [2.0, 1.5 * (1 + 1e-4)], 0.25), ref)
    assert not close["bitwise"] and not close["adapter_bitwise"] and close["within_tolerance"]
    assert close["max_loss_rel_diff"] == pytest.approx(1e-4)
    far = train_check.compare(_fake_run(tmp_path / "far", [2.0, 1.6], 0.25), ref)
    assert not far["within_tolerance"]
    with pytest.raises(train_check.CheckFailure, match="steps"):
        train_check.compare(_fake_run(tmp_path / "short", [2.0], 0.25), ref)


def test_preset_memory_estimates_come_from_the_headers() -> None:
    from moe_lora.recipes.compose import CONF_DIR

    rows = {r["preset"]: r for r in check_report.preset_estimates()}
    assert set(rows) == {p.stem for p in (CONF_DIR / "experiment").glob("*_paper.yaml")}
    for name, r in rows.items():
        text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
        assert r["low_gb"] <= r["high_gb"]
        assert re.search(rf"about {r['low_gb']:g}-{r['high_gb']:g} GB", text), name
    assert check_report.verdict(50, 40, 60) == "within" and check_report.verdict(61, 40, 60) == "above"
    assert check_report.verdict(30, 40, 60) == "below"
    compared = {r["preset"]: r for r in check_report.compare_estimates(50 * 10**9, applies=True)["presets"]}
    assert compared["adamoe_paper"]["verdict"] == "within"  # about 40-60 GB
