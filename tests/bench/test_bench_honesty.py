"""Honest small benches: a step-time ratio is not printed below MIN_ROUNDS rounds (unless --force,
then flagged), and is flagged when its rounds spread wide or its interval holds 1."""

from __future__ import annotations

import argparse
import json

import pytest

from moe_lora.bench.measure import MAX_SPREAD, MIN_ROUNDS, median_interval, report, unreliable
from moe_lora.bench.run import main as bench_main
from moe_lora.bench.run import table

CHEAP = ["--layers", "1", "--seq", "8", "--batch", "1", "--vocab", "256", "--threads", "1", "--device", "cpu"]
CHEAP += ["--large", "none", "--variants", "lora"]


def test_median_interval_is_the_order_statistic_interval() -> None:
    values = [float(x) for x in range(1, 21)]  # n = 20: P(Bin(20, 1/2) <= 5) = 0.0207 <= 0.025 < P(<= 6)
    assert median_interval(values) == (6.0, 15.0)
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few for 95%: the whole range
    assert median_interval([4.0]) == (4.0, 4.0)


def test_ratios_are_flagged_for_spread_or_an_interval_holding_one() -> None:
    steady_ref, steady_twice = [0.10, 0.101, 0.099, 0.1, 0.102], [0.2, 0.201, 0.199, 0.2, 0.202]
    assert unreliable({"a": steady_twice, "ref": steady_ref}, "a", "ref") is None
    outlier = [2.38, 0.25, 0.24, 0.26, 0.245]  # one slow round (a cold start) in the reference
    why = unreliable({"a": [0.226] * 5, "ref": outlier}, "a", "ref")
    assert why and "ref" in why and f"> {MAX_SPREAD:.0%}" in why
    steady = [0.25 + 0.001 * (i % 5) for i in range(20)]  # the same slow round among 20 leaves the median alone
    assert unreliable({"a": [0.226] * 20, "ref": [2.38, *steady[1:]]}, "a", "ref") is None
    same = [0.1, 0.11, 0.1, 0.105, 0.1]
    why = unreliable({"a": same[::-1], "ref": same}, "a", "ref")
    assert why and "holds 1" in why


def _result(rounds: int, force: bool, ref_s: list[float]) -> dict:
    times = {"peft_lora": ref_s[:rounds], "lora": [0.226] * rounds}
    raw = {
        "median_s": {v: sorted(t)[len(t) // 2] for v, t in times.items()},
        "round_s": times,
        "memory_bytes": {"peft_lora": 2**20, "lora": 2**20},
        "flops": {"peft_lora": 10**9, "lora": 10**9},
        "spread": {v: 0.0 for v in times},
    }
    return report(raw, argparse.Namespace(rounds=rounds, force=force))


@pytest.mark.parametrize("force", [False, True])
def test_few_rounds_print_no_ratio_without_force(force) -> None:
    """The issue's case: peft LoRA 2,380 ms against ours 226 ms over two rounds, printed as 0.09x."""
    res = _result(2, force, [2.38, 4.5])
    text = table(res)
    row = next(line for line in text.splitlines() if line.startswith("lora "))
    assert res["ratios_shown"] is force
    if force:
        assert row.split()[2].endswith("*") and "unreliable" in text and f"< {MIN_ROUNDS}" in text
    else:
        assert row.split()[2] == "-" and "not printed" in text and "--force" in text


def test_enough_steady_rounds_print_plain_ratios() -> None:
    res = _result(6, False, [0.452, 0.45, 0.451, 0.449, 0.452, 0.45])  # lora twice as fast, steady
    text = table(res)
    row = next(line for line in text.splitlines() if line.startswith("lora "))
    assert row.split()[2] == "0.50" and "warning" not in text, text
    res = _result(6, False, [2.38, 0.25, 0.24, 0.26, 0.245, 0.25])  # one cold round in peft LoRA
    text = table(res)
    assert next(line for line in text.splitlines() if line.startswith("lora ")).split()[2].endswith("*")
    assert "peft_lora" in text.split("warning:", 1)[1]


def test_a_real_small_bench_says_why_it_prints_no_ratio(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert bench_main([*CHEAP, "--rounds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "step-time ratios not printed: 2 rounds" in printed
    res = json.loads(out.read_text())
    assert res["rounds"] == 2 and not res["ratios_shown"] and len(res["step_ms_per_round"]["lora"]) == 2
    assert set(res["ratio_interval_vs_peft_lora"]) == {"lora"}
