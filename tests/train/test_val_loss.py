"""Validation loss during training (``recipe.val_every``): a ``val_loss`` line every N steps and at
the last one, kept by a resume; training untouched (adapter tensors, ``loss`` lines and
routing.jsonl byte for byte those of a run without validation); the report draws the lines. The
value itself: the per-token (or per-sequence) mean over every batch of every rank, equal on two
gloo ranks (plain and FSDP2) to one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moe_lora.config import RecipeConfig
from moe_lora.data.collate import pad_batch
from moe_lora.errors import ConfigError
from moe_lora.recipes.compose import load_config
from moe_lora.report import curves
from moe_lora.report.build import LOSS_CURVES, build_report
from moe_lora.report.collect import collect
from moe_lora.train.distributed import Dist, init_distributed, shard_fsdp, spawn
from moe_lora.train.loop import validation_batches, validation_loss
from moe_lora.train.loss import batch_loss
from moe_lora.train.precision import make_precision

RUN = ["recipe.max_steps=6", "recipe.log_every=2", "recipe.save_every=2"]  # smoke: batch 8, loramoe, dropout 0.05
VAL = ["recipe.val_every=4", "recipe.val_batches=2"]  # 16 of the tiny world's 48 validation examples


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _training_lines(run_dir: Path) -> list[str]:
    """metrics.jsonl without its timing lines (tokens_per_s is wall time)."""
    return [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "tokens_per_s" not in line]


@pytest.mark.slow  # three runs and a resume: ~5 s
def test_val_loss_every_n_steps_leaves_training_bitwise_equal_and_survives_resume(run_cli, tmp_path) -> None:
    plain, validated = tmp_path / "plain", tmp_path / "validated"
    code, _, err = run_cli("train", *RUN, f"hydra.run.dir={plain}")
    assert code == 0, err
    code, _, err = run_cli("train", *RUN, *VAL, f"hydra.run.dir={validated}")
    assert code == 0, err
    rows = _lines(validated / "metrics.jsonl")
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [4, 6]  # every 4 steps and the last one
    assert all(set(r) == {"step", "val_loss"} and 0 < r["val_loss"] < 20 for r in val), val
    assert not any("val_loss" in r for r in _lines(plain / "metrics.jsonl"))
    # training untouched: dropout's RNG stream, data order, routing statistics and aux losses
    for name in ("adapter_model.safetensors", "routing.jsonl"):
        assert (validated / name).read_bytes() == (plain / name).read_bytes(), name
    assert [line for line in _training_lines(validated) if "val_loss" not in line] == _training_lines(plain)
    perf, plain_perf = (json.loads((d / "results.json").read_text())["perf"] for d in (validated, plain))
    assert perf["val_runs"] == 2 and perf["val_s"] > 0 and "val_runs" not in plain_perf

    # a resume from step 4 (its checkpoint follows that step's validation) validates at the same
    # steps: the log ends byte for byte as before
    first, weights = _training_lines(validated), (validated / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(validated / "checkpoints" / "step-6")
    (validated / "results.json").unlink()
    code, _, err = run_cli("train", *RUN, *VAL, "resume=auto", f"hydra.run.dir={validated}")
    assert code == 0, err
    assert _training_lines(validated) == first
    assert (validated / "adapter_model.safetensors").read_bytes() == weights

    # the report's loss-curve plot has the validation lines
    runs = collect([validated])
    bands = curves.curves(runs, {runs[0].path: "loramoe"})
    assert sorted(bands["validation"]["loramoe"]) == [4, 6] and sorted(bands["train"]["loramoe"]) == [2, 4, 6]
    out = build_report([validated])
    assert "Loss curves (train and validation)" in (out / "index.md").read_text()
    assert (out / LOSS_CURVES).read_bytes()[:4] == b"\x89PNG"


def test_val_every_and_val_batches_refuse_negative_values() -> None:
    for key in ("recipe.val_every", "recipe.val_batches"):
        with pytest.raises(ConfigError, match=f"{key}.*must be >= 0"):
            load_config([f"{key}=-1"])


@pytest.mark.parametrize(
    ("size", "batch", "limit", "world", "expected"),
    [
        (5, 2, 0, 1, [[[0, 1], [2, 3], [4]]]),
        (5, 2, 2, 1, [[[0, 1], [2, 3]]]),
        # 11 examples on 2 ranks: cut to 10, each rank an equal share of each global batch of 4
        (11, 2, 0, 2, [[[0, 1], [4, 5], [8]], [[2, 3], [6, 7], [9]]]),
        (11, 2, 1, 2, [[[0, 1]], [[2, 3]]]),
        (1, 2, 0, 2, [[], []]),  # fewer examples than ranks: nothing (the loop refuses it)
    ],
)
def test_validation_batches_give_every_rank_an_equal_share(size, batch, limit, world, expected) -> None:
    recipe = RecipeConfig(batch_size=batch, val_batches=limit)
    assert [validation_batches(size, recipe, Dist(r, world)) for r in range(world)] == expected


class Rows:
    """Token rows with answers from ``start``: the loop's ``Batches`` protocol."""

    def __init__(self, rows: list[tuple[list[int], int]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return pad_batch([self.rows[i] for i in indices], [0] * len(indices), pad=0)


def _tiny() -> tuple[LlamaForCausalLM, Rows]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        attention_dropout=0.5,  # training mode would draw from the global RNG
    )
    lengths = [5, 9, 4, 7, 8, 3, 6, 9, 5, 7, 4]
    rows = [(torch.randint(1, 40, (n,)).tolist(), n // 2) for n in lengths]
    return LlamaForCausalLM(cfg).eval(), Rows(rows)


def _reference(model: LlamaForCausalLM, rows: Rows, n: int, normalization: str) -> float:
    """The loss of the first ``n`` rows as one batch: what the batched, summed value must equal."""
    model.eval()
    with torch.no_grad():
        batch = rows.batch(list(range(n)))
        return float(batch_loss(model, model.config, batch, seq2seq=False, normalization=normalization))


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_validation_loss_is_the_mean_over_every_batch_and_keeps_the_rng(normalization) -> None:
    model, rows = _tiny()
    model.train()
    recipe = RecipeConfig(batch_size=3, loss_normalization=normalization)
    precision = make_precision("cpu", "fp32", "float32")
    rng = torch.get_rng_state()
    loss = validation_loss(model, rows, validation_batches(len(rows), recipe, Dist()), recipe, precision, Dist())
    assert torch.equal(torch.get_rng_state(), rng) and model.training  # RNG untouched, training mode back
    assert loss == pytest.approx(_reference(model, rows, len(rows), normalization), rel=1e-5)


def _two_ranks(out: str) -> None:
    torch.set_num_threads(1)
    d = init_distributed("cpu")
    model, rows = _tiny()
    recipe = RecipeConfig(batch_size=2)
    precision = make_precision("cpu", "fp32", "float32")
    values = {"ddp": validation_loss(model, rows, validation_batches(len(rows), recipe, d), recipe, precision, d)}
    shard_fsdp(model)  # FSDP2: every forward is collective; each rank runs 3 non-empty ones
    values["fsdp"] = validation_loss(model, rows, validation_batches(len(rows), recipe, d), recipe, precision, d)
    if d.is_main:
        Path(out).write_text(json.dumps(values))


@pytest.mark.slow
def test_two_ranks_score_what_one_process_scores(tmp_path) -> None:
    out = tmp_path / "values.json"
    spawn(2, _two_ranks, str(out))
    model, rows = _tiny()
    expected = _reference(model, rows, 10, "token")  # 11 examples on 2 ranks: the first 10
    values = json.loads(out.read_text())
    assert values["ddp"] == pytest.approx(expected, rel=1e-5) and values["fsdp"] == pytest.approx(expected, rel=1e-5)
