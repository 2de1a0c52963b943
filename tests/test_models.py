"""Hub-style loading from a local directory shaped like a real model (no download)."""

from __future__ import annotations

import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moe_lora.config import WorldConfig
from moe_lora.world.generator import World
from moe_lora.world.tokenizer import word_tokenizer


def test_train_on_a_local_hub_style_model(run_cli, tmp_path) -> None:
    world = World(WorldConfig(num_people=40, bios_per_person=3))
    tok = word_tokenizer(world.vocab)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(world.vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    code, _out, err = run_cli(
        "train",
        "model.source=hub",
        f"model.name_or_path={tmp_path / 'llama'}",
        "model.name=local_llama",
        "adapter=loramoe",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert code == 0, err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["model"] == "local_llama" and res["params"]["adapted_modules"] == 6
    assert isinstance(res["metrics"]["cbqa_em"], float)


def test_local_dir_without_config_is_named(run_cli, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("train", "model.source=hub", f"model.name_or_path={tmp_path / 'empty'}", tiny=False)
    assert code == 2 and "config.json" in err and "model.name_or_path" in err
