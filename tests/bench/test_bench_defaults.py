"""`moe-lora bench` as the README runs it: the default shape (``--size tiny``: hidden 256, FFN 688,
head size 64), the default modules (all seven linears) and every default variant, built and
stepped. Only the costs shrink (one round, a short batch); torch.compile traces with dynamo's eager
backend here, so the compiled variant's graph is still traced without minutes of code generation."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from moe_lora.bench.measure import LOOPS, REFERENCE, adapted_variants
from moe_lora.bench.run import main as bench_main
from moe_lora.bench.run import parse

CHEAP = ["--rounds", "1", "--seq", "8", "--batch", "1", "--threads", "1"]


@pytest.mark.slow  # ~19 s CPU on one thread: 19 variants at the default width; tests/bench/test_reference.py and
# test_sweep.py step the bench's variants on small shapes, tests/adapters/test_compile.py traces each one
def test_bench_defaults_build_and_step_every_variant(tmp_path, monkeypatch, capsys) -> None:
    a = parse([])
    assert (a.hidden, a.ffn, a.modules, a.experts) == (256, 688, "all", 8)  # the shape that once crashed MoV
    assert a.ffn % (a.model_cfg.hidden_size // a.model_cfg.num_heads)  # FFN columns are no whole number of heads
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    out = tmp_path / "bench.json"
    assert bench_main([*CHEAP, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    ran = set(res["median_step_ms"])
    assert {*REFERENCE, *adapted_variants(), "loramoe_no_telemetry", "loramoe_compiled", *LOOPS} <= ran
    assert "mov" in ran and "large" not in res  # on the CPU no large shape by default
    assert all(ms > 0 for ms in res["median_step_ms"].values())
    assert res["settings"]["hidden"] == 256 and res["settings"]["ffn"] == 688
    assert "mov" in capsys.readouterr().out
