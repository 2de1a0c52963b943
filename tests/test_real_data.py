"""Real models on real-schema data, end to end through the CLI: tiny random checkpoints of each
family (tests/fixtures/checkpoints.py) on fixture files in the real datasets' schemas
(tests/fixtures/datasets.py), read through the same code as hub ids and hub datasets."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import read_jsonl

pytestmark = pytest.mark.slow  # `make test-fast` leaves these out

SMALL = [
    "recipe=smoke",
    "data.num_train=48",
    "data.max_length=96",
    "recipe.eval_limit=8",
    "eval.max_new_tokens=8",
    "eval.batch_size=8",
]
FAMILY = {"gpt2": "model=gpt2", "qwen2": "model=qwen2_5_0_5b", "llama": "model.source=hub"}


def train(run_cli, run_dir: Path, *args: str) -> dict:
    code, out, err = run_cli("train", *args, *SMALL, f"hydra.run.dir={run_dir}", tiny=False)
    assert code == 0, err
    res = json.loads((run_dir / "results.json").read_text())
    assert "CBQA EM (base -> tuned)" in out
    # knowledge retained is tuned over base EM: printed exactly when the base answered something
    assert ("knowledge retained" in out) == (res["metrics"].get("knowledge_retained") is not None)
    return res


def check_predictions(run_dir: Path, res: dict) -> None:
    """predictions.jsonl's ``correct`` averages to the reported EM, per set and model."""
    by = defaultdict(list)
    for p in read_jsonl(run_dir / "predictions.jsonl"):
        assert set(p) == {"model", "task", "id", "prompt", "prediction", "answers", "correct"}
        by[(p["model"], p["task"])].append(p["correct"])
    m = res["metrics"]
    for name, em in m["cbqa_em_by_set"].items():
        assert sum(by[("tuned", name)]) / len(by[("tuned", name)]) == pytest.approx(em)
        base = by[("base", name)]
        assert sum(base) / len(base) == pytest.approx(m["cbqa_em_by_set_base"][name])
    assert m["cbqa_em"] == pytest.approx(sum(m["cbqa_em_by_set"].values()) / len(m["cbqa_em_by_set"]))


@pytest.mark.parametrize(
    ("family", "adapter"), [("gpt2", "loramoe"), ("qwen2", "mov"), ("qwen2", "mola"), ("llama", "melora")]
)
def test_family_and_variant_train_on_triviaqa_alpaca(
    run_cli, tmp_path, checkpoints, data_root, task_dir, family, adapter
) -> None:
    # the llama run also checkpoints activations and runs a local lm-eval task on the adapted model
    extra = (
        [
            "model.gradient_checkpointing=true",
            "eval.harness.tasks=[tiny_mc]",
            "eval.harness.limit=4",
            f"eval.harness.include_path={task_dir}",
        ]
        if family == "llama"
        else []
    )
    res = train(
        run_cli,
        tmp_path / "run",
        FAMILY[family],
        f"model.name_or_path={checkpoints[family]}",
        f"adapter={adapter}",
        "data=triviaqa_alpaca",
        f"data.root={data_root}",
        *extra,
    )
    assert res["params"]["adapted_modules"] > 0 and res["params"]["trainable"] > 0
    m = res["metrics"]
    assert set(m["cbqa_em_by_set"]) == {"triviaqa"} and m["n_cbqa"] == 8
    assert set(m["response_loss_by_source"]) == {"alpaca"} and math.isfinite(m["response_loss"])
    check_predictions(tmp_path / "run", res)
    assert res["data"]["train"] and res["perf"]["tokens"] > 0
    if family == "llama":
        assert 0.0 <= m["harness"]["tiny_mc"]["acc"] <= 1.0
    if family == "qwen2":  # its YAML says bfloat16: bf16 autocast, float32 adapters
        assert res["config"]["model"]["dtype"] == "bfloat16"
        assert {str(t.dtype) for t in load_file(str(tmp_path / "run" / "adapter_model.safetensors")).values()} == {
            "torch.float32"
        }
    if adapter in ("loramoe", "mola"):
        routing = read_jsonl(tmp_path / "run" / "routing.jsonl")
        assert {r["task_type"] for r in routing} == {"cbqa", "instruction", "all"}


def test_paper_preset_runs_on_a_tiny_checkpoint(run_cli, tmp_path, checkpoints, data_root) -> None:
    """experiment=loramoe_forgetting_paper with recipe=smoke: per-set CBQA EM (base and tuned),
    knowledge retained, response loss, routing by task type and perf lines."""
    res = train(
        run_cli,
        tmp_path / "p",
        "experiment=loramoe_forgetting_paper",
        f"model.name_or_path={checkpoints['llama']}",
        f"data.root={data_root}",
    )
    assert res["recipe"] == "smoke" and res["config"]["recipe"]["max_steps"] == 6
    m = res["metrics"]
    assert set(m["cbqa_em_by_set"]) == set(m["cbqa_em_by_set_base"]) == {"triviaqa", "nq_open"}
    assert set(m["knowledge_retained_by_set"]) == {"triviaqa", "nq_open"}
    assert set(m["response_loss_by_source"]) == {"alpaca"}
    check_predictions(tmp_path / "p", res)
    lines = read_jsonl(tmp_path / "p" / "metrics.jsonl")
    assert [r["step"] for r in lines if "tokens_per_s" in r] == [2, 4, 6]
    assert all("loss" not in r for r in lines if "tokens_per_s" in r)
    routing = read_jsonl(tmp_path / "p" / "routing.jsonl")
    assert {r["task_type"] for r in routing} == {"cbqa", "instruction", "all"}
