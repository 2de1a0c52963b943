"""A hub checkpoint is read, not assumed: tiny random llama / qwen2 / gpt2 checkpoints (saved with
``save_pretrained``, tokenizers trained with ``tokenizers``) through the same code path as a hub id."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_lora.errors import ConfigError
from moe_lora.recipes.compose import load_config
from tests.fixtures.checkpoints import make_checkpoint

FAMILY_CONFIGS = {"gpt2": "model=gpt2", "qwen2": "model=qwen2_5_0_5b", "llama": "model.source=hub"}


def base_params(path) -> int:
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_params_prints_the_checkpoints_own_count(run_cli, checkpoints, family) -> None:
    path = checkpoints[family]
    code, out, err = run_cli("params", FAMILY_CONFIGS[family], f"model.name_or_path={path}", "adapter=lora", tiny=False)
    assert code == 0, err
    assert f"{base_params(path):,} base parameters" in out


def test_params_reads_any_checkpoint_shape(run_cli, tmp_path) -> None:
    """Not the tests' own fixture: 3 layers, 6 heads of declared head_dim 8 (hidden 40)."""
    path = make_checkpoint("qwen2", tmp_path / "q", layers=3, hidden=40, heads=5, kv_heads=1, head_dim=8)
    code, out, err = run_cli("params", "model=qwen2_5_0_5b", f"model.name_or_path={path}", "adapter=mov", tiny=False)
    assert code == 0, err
    assert f"{base_params(path):,} base parameters" in out
    assert len(re.findall(r"layers\.2\.", out)) == 3  # k, v, down of the third layer


def test_architecture_comes_from_config_json(checkpoints) -> None:
    cfg = load_config(["model=gpt2", f"model.name_or_path={checkpoints['gpt2']}"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.vocab_size) == (2, 32, 4, 400)
    cfg = load_config(["model.source=hub", f"model.name_or_path={checkpoints['llama']}"])
    assert cfg.model.name == "llama" and cfg.model.family == "llama"  # not labelled tiny_world
    assert cfg.model.num_kv_heads == 2 and cfg.model.head_dim == 8


def test_mov_head_size_comes_from_the_model(tmp_path) -> None:
    """Qwen2 with a declared head_dim that is not hidden // heads: MoV routes k/v per real head."""
    from moe_lora.adapters.variants.mov import MoVLinear
    from moe_lora.recipes.validate import base_meta_model

    path = make_checkpoint("qwen2", tmp_path / "q", hidden=32, heads=2, kv_heads=1, head_dim=24)
    cfg = load_config(["model=qwen2_5_0_5b", f"model.name_or_path={path}", "adapter=mov"])
    model = base_meta_model(cfg)
    from moe_lora.adapters.inject import inject_adapter

    names = inject_adapter(model, cfg.adapter, cfg.model, cfg.layout)
    k = model.get_submodule(next(n for n in names if n.endswith("k_proj")))
    assert isinstance(k, MoVLinear) and k.head_dim == 24 and k.router.weight.shape == (10, 24)


@pytest.mark.parametrize("adapter", ["ia3", "mov", "melora", "lora", "loramoe", "mola"])
def test_default_targets_fit_gpt2(checkpoints, adapter) -> None:
    """Default targets come from model.modules roles; GPT-2's fused c_attn serves query/key/value."""
    from moe_lora.adapters.inject import inject_adapter

    cfg = load_config(
        [
            "model=gpt2",
            f"model.name_or_path={checkpoints['gpt2']}",
            f"adapter={adapter}",
            "adapter.num_minis=4" if adapter == "melora" else "seed=0",
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(checkpoints["gpt2"])
    names = inject_adapter(model, cfg.adapter, cfg.model, cfg.layout)
    assert names and all(re.search(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$", n) for n in names)
    if adapter in ("ia3", "mov"):
        assert sorted({n.split(".", 3)[-1] for n in names}) == ["attn.c_attn", "mlp.c_proj"]
    out = model(torch.randint(0, 400, (2, 7))).logits
    assert out.shape == (2, 7, 400) and torch.isfinite(out).all()


def test_target_errors_come_before_any_weights_load(checkpoints) -> None:
    with pytest.raises(ConfigError, match=r"adapter.target_modules=\['nope'\] matched no linear"):
        load_config(
            ["model=gpt2", f"model.name_or_path={checkpoints['gpt2']}", "adapter=lora", "adapter.target_modules=[nope]"]
        )
    with pytest.raises(ConfigError, match=r"adapter\.num_minis=3"):
        load_config(
            ["model.source=hub", f"model.name_or_path={checkpoints['llama']}", "adapter=melora", "adapter.num_minis=3"]
        )
    with pytest.raises(ConfigError, match=r"layout\.experts"):
        load_config(
            [
                "model=gpt2",
                f"model.name_or_path={checkpoints['gpt2']}",
                "adapter=mola",
                "layout=custom",
                "layout.experts=[2,4,6]",
            ]
        )


def test_missing_device_fails_in_validate(checkpoints) -> None:
    with pytest.raises(ConfigError, match=r"recipe.device='cuda:7'"):
        load_config(["recipe.device=cuda:7"])


def test_real_data_needs_a_hub_model_and_training_examples(checkpoints, data_root) -> None:
    with pytest.raises(ConfigError, match=r"model\.source=world"):
        load_config(["data=triviaqa_alpaca", f"data.root={data_root}"])
    with pytest.raises(ConfigError, match=r"give no training examples"):
        load_config(
            [
                "model.source=hub",
                f"model.name_or_path={checkpoints['llama']}",
                "data=triviaqa_alpaca",
                f"data.root={data_root}",
                "data.sources.triviaqa.weight=0",
                "data.sources.alpaca.weight=0",
            ]
        )


def test_grouped_ranks_are_checked_per_layer(checkpoints) -> None:
    with pytest.raises(ConfigError, match=r"layout\.rank=6 with adapter\.expert_compute=grouped"):
        load_config(
            [
                "model=gpt2",
                f"model.name_or_path={checkpoints['gpt2']}",
                "adapter=mola",
                "adapter.expert_compute=grouped",
                "layout=custom",
                "layout.experts=[4,4]",
                "layout.rank=[8,6]",
            ]
        )
