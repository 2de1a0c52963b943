"""A tiny world, a few steps: every run writes a valid results.json and consistent logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moe_lora.adapters import ADAPTERS
from tests.conftest import read_jsonl

pytestmark = pytest.mark.slow  # `make test-fast` leaves these out

REQUIRED = ["cbqa_em_base", "cbqa_em", "cbqa_candidate_acc", "instruction_em", "knowledge_retained"]


def train(run_cli, run_dir: Path, *args: str) -> dict:
    code, out, err = run_cli("train", *args, f"hydra.run.dir={run_dir}")
    assert code == 0, err
    assert "knowledge retained" in out  # the summary table
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("adapter", ["lora", "loramoe"])
def test_train_writes_valid_results(run_cli, tmp_path, adapter) -> None:
    res = train(run_cli, tmp_path / adapter, f"adapter={adapter}")
    assert res["adapter"] == adapter and res["model"] == "tiny_world" and res["seed"] == 0
    assert all(isinstance(res["metrics"][k], float) for k in REQUIRED)
    assert 0 < res["params"]["trainable"] < res["params"]["total"]
    assert res["config"]["adapter"]["name"] == adapter and res["wall_s"] > 0
    lines = read_jsonl(tmp_path / adapter / "metrics.jsonl")
    rows = [r for r in lines if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6] and all(math.isfinite(r["loss"]) for r in rows)
    perf = [r for r in lines if "tokens_per_s" in r]  # throughput and memory on lines of their own
    assert [r["step"] for r in perf] == [2, 4, 6] and all(
        set(r) == {"step", "tokens_per_s", "peak_mem_bytes"} for r in perf
    )
    assert res["perf"]["tokens"] > 0 and res["perf"]["peak_mem_bytes"] > 0
    ev = res["perf"]["eval"]  # evaluation's own time, tokens and share of the wall time
    assert set(ev["seconds"]) == {"base", "tuned"} and all(v > 0 for v in ev["seconds"].values())
    assert all(n > 0 for n in ev["tokens"].values()) and 0 < ev["share_of_wall"] < 1
    assert ev["tokens_per_s"] == pytest.approx(sum(ev["tokens"].values()) / sum(ev["seconds"].values()))
    predictions = read_jsonl(tmp_path / adapter / "predictions.jsonl")
    for model in ("base", "tuned"):
        for task in ("cbqa", "instruction"):
            correct = [p["correct"] for p in predictions if p["model"] == model and p["task"] == task]
            key = f"{task}_em" + ("_base" if model == "base" else "")
            assert correct and sum(correct) / len(correct) == pytest.approx(res["metrics"][key])
    assert (tmp_path / adapter / "adapter_model.safetensors").exists()
    if adapter == "loramoe":
        assert res["params"]["adapted_modules"] == 6 and len(res["routing"]) == 6
        assert all(r["aux_loss"] > 0 for r in rows)
        routing = read_jsonl(tmp_path / adapter / "routing.jsonl")
        for module, stats in res["routing"].items():
            assert stats["cv"] > 0
            last = [r for r in routing if r["module"] == module and r["task_type"] == "all"][-1]
            imp = last["importance"]
            mean = sum(imp) / len(imp)
            std = math.sqrt(sum((x - mean) ** 2 for x in imp) / (len(imp) - 1))
            assert stats["cv"] == pytest.approx(std / mean, rel=1e-9)
        assert {r["task_type"] for r in routing} == {"cbqa", "instruction", "all"}
    else:
        assert res["routing"] == {} and all(r["aux_loss"] == 0 for r in rows)


def test_same_seed_same_metrics_and_lbc_changes_cv(run_cli, tmp_path) -> None:
    a = train(run_cli, tmp_path / "a")
    b = train(run_cli, tmp_path / "b")
    assert a["metrics"] == b["metrics"] and a["routing"] == b["routing"]

    def losses(run: str) -> list[dict]:
        return [r for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "loss" in r]

    assert losses("a") == losses("b")
    c = train(run_cli, tmp_path / "c", "adapter.lbc_beta=0")
    module = next(iter(a["routing"]))
    assert c["routing"][module]["cv"] != a["routing"][module]["cv"]
    assert all(r["aux_loss"] == 0 for r in losses("c"))


def test_eval_reevaluates_a_saved_run(run_cli, tmp_path) -> None:
    res = train(run_cli, tmp_path / "run", "adapter=loramoe")
    code, _out, err = run_cli("eval", f"run_dir={tmp_path / 'run'}", tiny=False)
    assert code == 0, err
    evals = list((tmp_path / "run").glob("eval-*.json"))
    assert len(evals) == 1
    metrics = json.loads(evals[0].read_text())["metrics"]
    assert metrics["cbqa_em"] == res["metrics"]["cbqa_em"]
    assert metrics["instruction_em"] == res["metrics"]["instruction_em"]
    code, _, err = run_cli("eval", f"run_dir={tmp_path / 'nope'}", tiny=False)
    assert code == 2 and "run_dir" in err


def test_multirun_sweep(run_cli, tmp_path) -> None:
    code, _, err = run_cli(
        "train", "-m", "adapter=lora,loramoe", f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${adapter.name}"
    )
    assert code == 0, err
    assert {p.parent.name for p in tmp_path.glob("*/results.json")} == {"lora", "loramoe"}


def test_wandb_offline_never_blocks(run_cli, tmp_path) -> None:
    train(run_cli, tmp_path / "w", "adapter=lora", "logger=wandb")
    assert any((tmp_path / "w" / "wandb").glob("offline-run-*"))


def test_params_command(run_cli) -> None:
    code, out, _ = run_cli("params", "adapter=loramoe", "adapter.num_experts=4")
    rows = [line for line in out.splitlines() if line.startswith("model.layers.")]  # the per-module table
    assert code == 0 and "trainable:" in out and "routers" in out and sum(".mlp." in r for r in rows) == 6


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_every_variant_runs_end_to_end(run_cli, tmp_path, adapter) -> None:
    res = train(run_cli, tmp_path / adapter, f"adapter={adapter}", "recipe.realloc_every=2")
    assert res["adapter"] == adapter and all(res["metrics"][k] is not None for k in ("cbqa_em", "instruction_em"))
    trainable = res["params"]["trainable"]
    assert (trainable == 0) == (adapter == "none")
    if adapter == "none":
        assert res["metrics"]["cbqa_em"] == res["metrics"]["cbqa_em_base"]
    if adapter == "alora":
        ranks = res["adapter_report"]["alora_ranks"]
        assert sum(ranks.values()) == 8 * len(ranks) and len(ranks) == 14
        moves = [r for r in read_jsonl(tmp_path / adapter / "metrics.jsonl") if "alora_pruned" in r]
        assert [r["step"] for r in moves] == [2, 4]
    if adapter == "adamoe":
        per_token = [r["real_experts_per_token"] for r in res["routing"].values()]
        assert all(0 <= x <= 4 for x in per_token)


def test_grouped_and_compiled_training_match_dense_eager(run_cli, tmp_path) -> None:
    """The grouped-GEMM top-k path and torch.compile are implementation choices: the same seed gives
    the same losses as the dense eager run (up to float summation order)."""
    runs = {"dense": [], "grouped": ["adapter.expert_compute=grouped"], "compiled": ["recipe.compile=true"]}
    losses = {}
    for name, extra in runs.items():
        train(run_cli, tmp_path / name, "adapter=mola", "adapter.rank=4", *extra)
        losses[name] = [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]
    assert losses["dense"] and len(losses["grouped"]) == len(losses["dense"]) == len(losses["compiled"])
    for name in ("grouped", "compiled"):
        assert losses[name] == pytest.approx(losses["dense"], rel=1e-3), name
