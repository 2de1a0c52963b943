"""Rows with an empty target (issue 28, item 5): skipped, but counted in one warning line per source
and split, and a split whose every row is empty fails in one line naming the source and its file
(a probe once trained on 2 examples instead of 16 without a word)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from moe_lora.config import DataConfig, SourceConfig
from moe_lora.data.sources import first_examples, source_mixture
from moe_lora.errors import ConfigError


def alpaca_file(path: Path, outputs: list[str]) -> Path:
    """An Alpaca-shaped JSONL file, one row per output."""
    rows = [{"instruction": f"task {i}", "input": "", "output": out} for i, out in enumerate(outputs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca(path: Path, **override) -> DataConfig:
    fields = {"instruction": "instruction", "input": "input", "output": "output"}
    src = SourceConfig(path=str(path), task_type="instruction", template="alpaca", fields=fields, **override)
    return DataConfig(name="test", sources={"alpaca": src}, num_train=18)


def test_empty_targets_are_counted_in_one_warning_line(tmp_path: Path, caplog) -> None:
    # 20 rows: the last 2 are held out (validation), 12 of the 18 sampled are empty
    outputs = ["" if i % 3 else f"answer {i}" for i in range(18)] + ["kept", "kept"]
    outputs[1] = "   "  # whitespace only is empty too
    cfg = alpaca(alpaca_file(tmp_path / "a.jsonl", outputs), split="train", eval_split=None)
    with caplog.at_level(logging.WARNING, logger="moe_lora.data.sources"):
        mix = source_mixture(cfg, seed=0)
    assert len(mix.train) == 6 and mix.info["sources"]["alpaca"]["skipped"] == 12
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert lines[0].startswith("data.sources.alpaca.split: 12 of the 18 rows taken from ")
    assert str(tmp_path / "a.jsonl") in lines[0] and "empty target (output)" in lines[0]


def test_no_warning_without_empty_targets(tmp_path: Path, caplog) -> None:
    cfg = alpaca(alpaca_file(tmp_path / "a.jsonl", [f"answer {i}" for i in range(20)]), eval_split=None)
    with caplog.at_level(logging.WARNING, logger="moe_lora.data.sources"):
        assert len(source_mixture(cfg, seed=0).train) == 18
    assert caplog.records == []


@pytest.mark.parametrize("which", ["split", "eval_split"])
def test_a_split_without_any_target_fails_in_one_line(tmp_path: Path, which: str) -> None:
    file = alpaca_file(tmp_path / "empty.jsonl", [""] * 20)
    cfg = alpaca(
        file, split="train" if which == "split" else None, eval_split="train" if which == "eval_split" else None
    )
    with pytest.raises(ConfigError) as info:
        source_mixture(cfg, seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"data.sources.alpaca.{which}: all ") and str(file) in message
    assert message.endswith("have an empty target (output): no usable example")


def test_a_small_split_without_any_target_fails_before_the_run(tmp_path: Path) -> None:
    """Read whole by the checks before a run (16 rows or fewer), it fails there; a larger split
    fails when its mixture is built, and a split whose first rows alone are empty passes."""
    cfg = alpaca(alpaca_file(tmp_path / "small.jsonl", [""] * 10), split="train")
    with pytest.raises(ConfigError, match=r"^data\.sources\.alpaca\.split: all 10 rows taken from .*small\.jsonl"):
        first_examples(cfg)
    later = alpaca(alpaca_file(tmp_path / "later.jsonl", [""] * 16 + ["answer"] * 4), split="train")
    assert first_examples(later) == []
