"""Quieter, smaller runs (issue 34, item 8): a finished run drops its final checkpoint's optimizer
state unless ``recipe.keep_final_state=true`` and is still skipped (or refused in one line) on a
rerun; the summary prints only what the run computed, and ``moe-lora eval`` prints the same
summary; ``train.log`` exists only when the run logged something."""

from __future__ import annotations

import json
from pathlib import Path

from moe_lora.recipes.results import summary_table
from moe_lora.train import checkpoint as ckpt


def _final(run_dir: Path) -> Path:
    (step,) = (run_dir / "checkpoints").iterdir()
    return step


def test_a_finished_run_keeps_no_optimizer_state_and_is_skipped_or_refused(run_cli, tmp_path) -> None:
    run_dir = tmp_path / "run"
    code, out, err = run_cli("train", f"hydra.run.dir={run_dir}")
    assert code == 0, err
    final = _final(run_dir)
    meta = json.loads((final / "checkpoint.json").read_text())
    assert not (final / "optimizer.pt").exists() and "optimizer.pt" not in meta["files"]
    assert meta["optimizer_state"] == ckpt.OPTIMIZER_REMOVED
    ckpt.read_meta(final)  # sizes and SHA-256s of what is left still verify
    # the summary: only what a world run computed (no response loss, no "- -> -" row)
    assert "knowledge retained" in out and "response loss" not in out and "- -> -" not in out
    assert not (run_dir / "train.log").exists()  # nothing was logged
    results = (run_dir / "results.json").read_bytes()
    code, out, err = run_cli("train", "resume=auto", f"hydra.run.dir={run_dir}")
    assert code == 0 and "skipped" in out, err
    assert (run_dir / "results.json").read_bytes() == results
    # moe-lora eval re-evaluates base and tuned: train's summary, knowledge retained included
    code, out, err = run_cli("eval", f"run_dir={run_dir}")
    assert code == 0, err
    assert "knowledge retained" in out and "CBQA EM (base -> tuned)" in out
    assert not any(bad in out for bad in ("None", "{}", "- -> -", "response loss")), out
    (record,) = run_dir.glob("eval-*[0-9].json")
    assert json.loads(record.read_text())["metrics"]["cbqa_em"] == json.loads(results)["metrics"]["cbqa_em"]
    (run_dir / "results.json").unlink()  # a finished run's final checkpoint cannot be resumed
    code, _, err = run_cli("train", "resume=auto", f"hydra.run.dir={run_dir}")
    assert code == 2 and "without its optimizer state (recipe.keep_final_state=false)" in err, err
    assert len(err.strip().splitlines()) == 1


def test_keep_final_state_keeps_a_resumable_checkpoint_and_train_log_holds_the_log(run_cli, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = ["adapter=mola", "layout=triangle", "recipe.keep_final_state=true", f"hydra.run.dir={run_dir}"]
    code, _, err = run_cli("train", *args)
    assert code == 0, err
    final = _final(run_dir)
    assert (final / "optimizer.pt").is_file() and "optimizer_state" not in ckpt.read_meta(final)
    assert "layout=triangle sets experts per layer" in (run_dir / "train.log").read_text()


def test_the_summary_has_no_rows_for_what_a_run_did_not_compute() -> None:
    results = {
        "adapter": "lora",
        "model": "m",
        "seed": 0,
        "params": {"trainable": 1, "total": 2},
        "metrics": {"cbqa_em": 0.5, "cbqa_em_base": 0.25, "knowledge_retained": 2.0, "response_loss": None},
        "routing": {},
        "wall_s": 1.0,
    }
    table = summary_table(results)
    assert "CBQA EM (base -> tuned)  0.250 -> 0.500" in table and "knowledge retained" in table
    for absent in ("response loss", "routing CV", "tokens/s", "evaluation", "instruction EM", " - "):
        assert absent not in table, absent
