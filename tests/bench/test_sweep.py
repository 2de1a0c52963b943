"""The expert sweep (`moe-lora bench --experts 2,4`): one table row per count, a PNG, a JSON with
every count's measurement; `--top-k` reaches the top-k variants only; the variants of a measurement
share one frozen base."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from moe_lora.bench.measure import build, make_batch, resident_bytes, train_step
from moe_lora.bench.run import adapter_config, parse
from moe_lora.bench.run import main as bench_main
from moe_lora.bench.sweep import plot_path
from moe_lora.errors import ConfigError

TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--ffn", "64", "--vocab", "50", "--seq", "8"]
TINY += ["--batch", "2", "--rounds", "2", "--threads", "1"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_sweep_writes_a_row_per_count_a_png_and_the_json(tmp_path, capsys) -> None:
    out = tmp_path / "sweep.json"
    args = [*TINY, "--experts", "4,2", "--variants", "mola,mola_grouped", "--out", str(out)]
    assert bench_main(args) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["2", "4"]  # sorted, one row each
    assert "mola grouped/dense" in printed.splitlines()[printed.splitlines().index(rows[0]) - 2]
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG)
    res = json.loads(out.read_text())
    assert res["experts"] == [2, 4] and res["variants"] == ["peft_lora", "mola", "mola_grouped"]
    assert res["settings"]["experts"] == [2, 4] and res["plot"] == str(tmp_path / "sweep.png")
    assert set(res["by_experts"]) == {"2", "4"} and res["table"] in printed
    s = res["series"]
    assert all(len(v) == 2 for series in s.values() for v in series.values())
    assert s["peft_lora"]["ratio_vs_peft_lora"] == [1.0, 1.0]
    dense, grouped = s["mola"]["flop_ratio_vs_peft_lora"], s["mola_grouped"]["flop_ratio_vs_peft_lora"]
    assert dense[1] > dense[0] and grouped[1] - grouped[0] < dense[1] - dense[0]  # top-2: grouped grows less
    assert s["mola"]["memory_mb"][1] > s["mola"]["memory_mb"][0]
    ratio = res["grouped_over_dense"]["mola"]
    expected = [g / d for g, d in zip(s["mola_grouped"]["median_step_ms"], s["mola"]["median_step_ms"], strict=True)]
    assert ratio == pytest.approx(expected)
    with pytest.raises(ConfigError, match="exists"):  # neither the JSON nor the PNG is replaced silently
        bench_main(args)
    out.unlink()
    with pytest.raises(ConfigError, match=r"the plot .* exists"):
        bench_main(args)


def test_expert_counts_parse() -> None:
    assert parse(["--experts", "8"]).experts == 8 and not parse([]).sweep  # one count: an int, as before
    a = parse(["--experts", "16,4,8"])
    assert a.experts == [4, 8, 16] and a.sweep and a.large == "none"
    for bad in ("4,x", "8,8", "0"):
        with pytest.raises(SystemExit):
            parse(["--experts", bad])
    with pytest.raises(ConfigError, match="--large 7b"):
        parse(["--experts", "4,8", "--large", "7b"])


def test_plot_goes_beside_out_or_to_plot(tmp_path) -> None:
    a = parse(["--experts", "2,4", "--out", str(tmp_path / "r.json")])
    assert plot_path(a) == tmp_path / "r.png"
    a = parse(["--experts", "2,4", "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
    assert plot_path(a) == tmp_path / "p.png"
    with pytest.raises(ConfigError, match=r"ends in \.png"):
        plot_path(parse(["--experts", "2,4", "--out", str(tmp_path / "r.png")]))


def test_top_k_reaches_the_top_k_variants_only() -> None:
    a = parse(["--experts", "6", "--top-k", "3"])
    assert adapter_config("mola", a).top_k == 3
    adamoe = adapter_config("adamoe", a)
    assert (adamoe.top_k, adamoe.num_experts) == (3, 6)  # AdaMoE's real experts follow --experts too
    assert adapter_config("loramoe", a).top_k is None  # soft routing stays soft
    grouped = adapter_config("mola", a, grouped=True)
    assert (grouped.expert_compute, grouped.top_k) == ("grouped", 3)
    assert adapter_config("mola", parse([])).top_k == 2  # without --top-k: the variant's default


def test_variants_share_one_frozen_base() -> None:
    from moe_lora.bench.measure import base_model

    a = parse(TINY)
    base = base_model(a)
    cases = {v: build(v, a, base) for v in ("base", "peft_lora", "mola")}
    batch = make_batch(a)
    weight = base.model.layers[0].mlp.down_proj.weight
    before = weight.detach().clone()
    ptrs = {v: {p.data_ptr() for p in c.model.parameters()} for v, c in cases.items()}
    assert weight.data_ptr() in ptrs["peft_lora"] and weight.data_ptr() in ptrs["mola"]
    emb = base.get_input_embeddings().weight
    assert emb.data_ptr() not in ptrs["base"] and not emb.requires_grad  # "base" trains a copy of its own
    for case in cases.values():
        train_step(case, batch)
    assert torch.equal(weight, before) and not weight.requires_grad
    mola = cases["mola"]
    params = {p.data_ptr(): p for p in mola.model.parameters()}.values()
    trainable = [p.numel() * p.element_size() for p in params if p.requires_grad]
    weights_and_moments = sum(p.numel() * p.element_size() for p in params) + 2 * sum(trainable)
    extra = resident_bytes(mola) - weights_and_moments  # AdamW's step counters: a scalar per tensor
    assert 0 < extra <= 8 * len(trainable)


def test_settings_record_paths_as_text(tmp_path) -> None:
    from moe_lora.bench.measure import settings

    s = settings(argparse.Namespace(out=tmp_path / "x.json", plot=None, model_cfg=object(), experts=[2, 4]))
    assert s["out"] == str(tmp_path / "x.json") and "model_cfg" not in s
    json.dumps(s)
