"""LoRA on the routed experts of an MoE base at scale: two gloo ranks (DDP, FSDP2 with the fused
expert tensors and their adapters sharded per decoder layer, a bf16 base beside float32 adapters)
train as one process with the global batch, and a run killed mid-step or resumed from a two-rank
checkpoint ends bitwise where the uninterrupted run ends.

The base is a tiny Mixtral checkpoint (tests/fixtures/moe.py: fused ``gate_up_proj`` /
``down_proj``, every layer sparse) on fixture TriviaQA + Alpaca files; its router is frozen and
watched, so routing.jsonl (the base router's load per window) is compared too. One spawn of two
CPU processes runs every two-rank case (see tests/train/test_distributed.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.moe import make_moe_checkpoint
from tests.train.test_checkpoint import assert_same_end
from tests.train.test_distributed import B, _config, _lines, _ranks_worker, assert_same_training

pytestmark = pytest.mark.slow  # two spawned ranks and four runs: ~40 s on two cores

LORA_ON_EXPERTS = ["adapter=lora", "adapter.target_modules=[attention,experts]"]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    return make_moe_checkpoint("mixtral", tmp_path_factory.mktemp("moe_dist") / "mixtral")


def moe_case(model: Path, data_root: Path) -> list[str]:
    return [
        "model.source=hub",
        f"model.name_or_path={model}",
        *LORA_ON_EXPERTS,
        "data=triviaqa_alpaca",
        f"data.root={data_root}",
        "data.num_train=48",
        "data.max_length=96",
        "eval.max_new_tokens=8",
    ]


@pytest.fixture(scope="module")
def moe_ranks(tmp_path_factory, cache_dir, mixtral, data_root) -> Path:
    from moe_lora.train.distributed import spawn

    out = tmp_path_factory.mktemp("moe_ranks")
    case = moe_case(mixtral, data_root)
    cases = {
        "ddp": case,
        "fsdp": [*case, "recipe.strategy=fsdp"],
        "fsdp_bf16_base": [*case, "recipe.strategy=fsdp", "model.dtype=bfloat16"],
        "ddp_resume": [*case, "recipe.save_every=2", "recipe.log_every=1", "adapter.dropout=0.1"],
    }
    spawn(2, _ranks_worker, cases, str(out), str(cache_dir))
    return out


def expert_adapter_names(run_dir: Path) -> set[str]:
    from moe_lora.recipes.runner import ADAPTER_FILE

    return {k for k in load_file(str(run_dir / ADAPTER_FILE)) if ".experts." in k}


def test_ddp_on_expert_adapters_equals_one_process(moe_ranks, mixtral, data_root, cache_dir, tmp_path) -> None:
    from moe_lora.recipes.runner import run

    run(_config(moe_case(mixtral, data_root), 2 * B, str(cache_dir)), tmp_path, progress=False)
    assert_same_training(moe_ranks / "ddp", tmp_path)
    experts = expert_adapter_names(tmp_path)
    assert {k.split(".layers.")[1].split(".")[0] for k in experts} == {"0", "1", "2"}, sorted(experts)
    assert any("gate_up" in k for k in experts) and any("down" in k for k in experts)
    assert _lines(tmp_path, "routing.jsonl"), "the base router is watched"


def test_fsdp_on_expert_adapters_matches_ddp(moe_ranks) -> None:
    results = json.loads((moe_ranks / "fsdp" / "results.json").read_text())
    assert results["perf"]["strategy"] == "fsdp" and results["perf"]["ranks"] == 2
    assert_same_training(moe_ranks / "fsdp", moe_ranks / "ddp")


def test_fsdp_bf16_base_keeps_float32_expert_adapters(moe_ranks) -> None:
    from moe_lora.recipes.runner import ADAPTER_FILE

    run_dir = moe_ranks / "fsdp_bf16_base"
    loss = [r["loss"] for r in _lines(run_dir, "metrics.jsonl") if "loss" in r]
    assert len(loss) == 2 and all(math.isfinite(x) for x in loss)
    tensors = load_file(str(run_dir / ADAPTER_FILE))
    assert expert_adapter_names(run_dir) and {t.dtype for t in tensors.values()} == {torch.float32}


def test_two_ranks_resume_expert_adapters_bitwise(moe_ranks) -> None:
    run_dir = moe_ranks / "ddp_resume"
    assert expert_adapter_names(run_dir)
    assert (run_dir / "adapter_model.safetensors").read_bytes() == (run_dir / "first.safetensors").read_bytes()
    first = [line for line in (run_dir / "first_metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    again = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(first) == 4 and again == first


def test_resumed_from_a_checkpoint_ends_bitwise_with_a_bf16_base(mixtral, data_root, cache_dir, tmp_path) -> None:
    """One process, a bf16 base and float32 expert adapters with dropout: resumed from its step-2
    checkpoint, the run ends with the uninterrupted run's bytes (adapter, loss lines, routing)."""
    import shutil

    from moe_lora.recipes.runner import ADAPTER_FILE, run

    overrides = [*moe_case(mixtral, data_root), "model.dtype=bfloat16", "adapter.dropout=0.1"]
    overrides += ["recipe.save_every=2", "recipe.log_every=1"]
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    run(_config(overrides, B, str(cache_dir)), reference, progress=False)
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    for name in ("results.json", ADAPTER_FILE):
        (run_dir / name).unlink()
    run(_config(overrides, B, str(cache_dir)), run_dir, progress=False, resume=run_dir / "checkpoints" / "step-2")
    assert_same_end(run_dir, reference)
    assert expert_adapter_names(run_dir) and {t.dtype for t in load_file(str(run_dir / ADAPTER_FILE)).values()} == {
        torch.float32
    }
