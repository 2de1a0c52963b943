"""Released MoE bases at scale, counted on the meta device: the four model configs with hub ids
(conf/model/{mixtral_8x7b,olmoe_1b_7b,qwen3_30b_a3b,gpt_oss_20b}.yaml) build their architecture from
``model.config_fields`` (no download), and ``moe-lora params`` with LoRA on ``[experts]`` prints the
trainable count peft's ``target_parameters`` gives on the same model. The table of
docs/real-models.md ("MoE bases at scale") is read here and every number in it checked against both."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from moe_lora.errors import ConfigError
from moe_lora.model.load import meta_model
from moe_lora.recipes.compose import load_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mixtral_8x7b", "olmoe_1b_7b", "qwen3_30b_a3b", "gpt_oss_20b")
ARGS = ("adapter=lora", "adapter.target_modules=[experts]")


def documented() -> dict[str, list[str]]:
    """model -> the cells of its row in the docs table."""
    rows = re.findall(r"^\| `model=(\w+)` \|(.*)\|$", (ROOT / "docs/real-models.md").read_text(), flags=re.M)
    return {name: [c.strip() for c in cells.split("|")] for name, cells in rows}


def peft_trainable(model: torch.nn.Module) -> int:
    """peft's trainable count with LoRA on the fused expert tensors (r=8, as adapter=lora), built on
    the meta device like ours: its A/B are allocated nowhere."""
    config = LoraConfig(
        r=8, lora_alpha=8, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    with torch.device("meta"):
        peft_model = get_peft_model(model, config)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_the_docs_table_names_the_four_models() -> None:
    assert sorted(documented()) == sorted(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_params_counts_as_peft_and_as_documented(name, run_cli) -> None:
    code, out, err = run_cli("params", f"model={name}", *ARGS, tiny=False)
    assert code == 0, err[-2000:]
    base = int(re.search(rf"model {name}: ([\d,]+) base parameters", out)[1].replace(",", ""))
    ours = int(re.search(r"trainable: ([\d,]+) \(", out)[1].replace(",", ""))
    cfg = load_config([f"model={name}", *ARGS], check_files=False)
    model = meta_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == base
    theirs = peft_trainable(model)
    assert ours == theirs
    shape, base_doc, ours_doc, peft_doc = documented()[name]
    assert [base_doc, ours_doc, peft_doc] == [f"{base:,}", f"{ours:,}", f"{theirs:,}"]
    experts, top_k = re.search(r"; (\d+) routed experts \(fused tensors\), top-(\d+)", out).groups()
    sparse = re.search(r"MoE: sparse layers \[([\d, ]*)\]", out)[1].split(", ")
    assert shape == f"{experts}, top-{top_k}, {len(sparse)} of {cfg.model.num_layers}"


def test_a_misspelt_config_field_stops_in_one_line() -> None:
    """Transformers keeps an unknown key as an attribute nobody reads: the count would be wrong."""
    with pytest.raises(ConfigError, match=r"model\.config_fields\.num_local_expert is not a field of .*MixtralConfig"):
        load_config(["model=mixtral_8x7b", "+model.config_fields.num_local_expert=4"], check_files=False)


def test_config_fields_describe_a_hub_model_only() -> None:
    with pytest.raises(ConfigError, match=r"model\.config_fields=.* describes a hub model"):
        load_config(["+model.config_fields.num_experts=4"], check_files=False)


def test_bench_prints_lora_on_experts_against_peft(tmp_path, capsys) -> None:
    """`moe-lora bench --experts-vs-peft COUNTS`: the rows of moe_lora.bench.experts_vs_peft, with the
    bench flags that apply there (tiny here: one layer, one round)."""
    from moe_lora.bench.run import main as bench_main

    out = tmp_path / "experts.json"
    small = ["--rounds", "1", "--layers", "1", "--seq", "8", "--batch", "1", "--vocab", "64", "--hidden", "32"]
    assert bench_main(["--experts-vs-peft", "2,4", *small, "--ffn", "48", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LoRA on experts vs peft target_parameters" in printed and "intermediate 48, 1 layers" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["experts"] for r in rows] == [2, 4]
    assert rows[1]["trainable"] == 2 * rows[0]["trainable"]  # one rank-8 pair per expert, as peft's
    assert all(r["memory_bytes"]["ours"] > 0 and r["memory_bytes"]["peft"] > 0 for r in rows)


def test_bench_flags_that_do_not_apply_to_the_expert_comparison_stop(tmp_path) -> None:
    from moe_lora.bench.run import main as bench_main

    with pytest.raises(ConfigError, match=r"--size does not apply to --experts-vs-peft"):
        bench_main(["--experts-vs-peft", "--size", "0.5b"])
