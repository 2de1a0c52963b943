"""The LoRA-on-experts benchmark runs end to end on a tiny shape: equal trainable counts on both
sides (asserted inside), a table row per expert count, and less step memory than peft's at 32
experts (memory is counted from saved tensors, so it does not depend on the machine's load)."""

from __future__ import annotations

import json

from moe_lora.bench.experts_vs_peft import main

TINY = ["--hidden", "32", "--intermediate", "64", "--layers", "1", "--batch", "2", "--seq", "8", "--vocab", "64"]


def test_bench_rows_and_memory(tmp_path, capsys) -> None:
    out = tmp_path / "rows.json"
    assert main([*TINY, "--experts", "4,32", "--rounds", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["experts"] for r in rows] == [4, 32] and rows[1]["trainable"] == 8 * rows[0]["trainable"]
    assert rows[1]["memory_ratio"] < 1, rows[1]["memory_bytes"]
    assert "LoRA on experts vs peft target_parameters" in table and len(table.strip().splitlines()) == 4
