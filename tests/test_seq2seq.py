"""Encoder-decoders (T5) on the meta device: the MoV paper's parameter counts from conf/model, and
tiny random T5 checkpoints (v1.1 gated and v1.0 `wi`) adapted in both stacks, self- and
cross-attention alike; training them is refused with one line until seq2seq batches exist."""

from __future__ import annotations

import re

import pytest
import torch


@pytest.mark.parametrize(
    ("adapter", "trainable"),
    [
        ("ia3", 540_672),
        ("mov adapter.num_experts=10", 7_956_480),
        ("mov adapter.num_experts=30", 23_869_440),
        ("mov adapter.num_experts=60", 47_738_880),
    ],
)
def test_t5_xl_counts_are_the_papers(run_cli, adapter, trainable) -> None:
    code, out, err = run_cli("params", "model=t5_v1_1_lm_adapt_xl", *f"adapter={adapter}".split(), tiny=False)
    assert code == 0, out + err
    assert f"trainable: {trainable:,} " in out and "2,783,959,040 base parameters" in out  # T5 v1.1 XL: 2.78B


@pytest.fixture(scope="module")
def t5_checkpoints(tmp_path_factory):
    from transformers import T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("t5")
    paths = {}
    for name, ffn in (("v1_1", "gated-gelu"), ("v1_0", "relu")):
        torch.manual_seed(0)
        cfg = T5Config(
            vocab_size=64,
            d_model=32,
            d_ff=48,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            num_decoder_layers=3,
            feed_forward_proj=ffn,
            decoder_start_token_id=0,
            tie_word_embeddings=False,
        )
        T5ForConditionalGeneration(cfg).save_pretrained(root / name)
        paths[name] = root / name
    return paths


@pytest.mark.parametrize("version", ["v1_1", "v1_0"])
def test_tiny_t5_checkpoints_adapt_both_stacks_and_cross_attention(run_cli, t5_checkpoints, version) -> None:
    path = t5_checkpoints[version]
    code, out, err = run_cli(
        "params", "model.source=hub", f"model.name_or_path={path}", "adapter=mov", "adapter.num_experts=2", tiny=False
    )
    assert code == 0, out + err
    rows = re.findall(r"^((?:en|de)coder\.block\.\d+\.\S+)\s+(\d+)", out, flags=re.M)
    names = {n for n, _ in rows}
    assert {int(layer) for _, layer in rows} == set(range(5))  # 2 encoder + 3 decoder layers, one index
    for i in range(2):
        assert {f"encoder.block.{i}.layer.0.SelfAttention.{x}" for x in "kv"} <= names
        assert f"encoder.block.{i}.layer.1.DenseReluDense.wo" in names
    for i in range(3):
        assert {
            f"decoder.block.{i}.layer.{j}.{a}.{x}"
            for j, a in ((0, "SelfAttention"), (1, "EncDecAttention"))
            for x in "kv"
        } <= names
        assert f"decoder.block.{i}.layer.2.DenseReluDense.wo" in names
    assert len(names) == 2 * 3 + 3 * 5  # k, v (+ cross k, v) and the FFN output's input, nothing else
    ffn_in = ["wi_0", "wi_1"] if version == "v1_1" else ["wi"]
    assert not any(n.endswith(tuple(ffn_in)) for n in names)


def test_training_an_encoder_decoder_is_refused_in_one_line(run_cli, t5_checkpoints, tmp_path) -> None:
    code, out, err = run_cli(
        "train",
        "model.source=hub",
        f"model.name_or_path={t5_checkpoints['v1_1']}",
        "adapter=ia3",
        f"hydra.run.dir={tmp_path / 'run'}",
        tiny=False,
    )
    assert code != 0 and "is a t5 encoder-decoder" in out + err and "model.name_or_path=" in out + err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("size", ["large", "xl", "xxl"])
def test_t5_model_configs_build_on_the_meta_device_with_both_stacks(size) -> None:
    from moe_lora.compose import load_config
    from moe_lora.models import meta_model
    from moe_lora.structure import find_stacks

    cfg = load_config([f"model=t5_v1_1_lm_adapt_{size}"], check_files=False).model
    model = meta_model(cfg)
    assert type(model).__name__ == "T5ForConditionalGeneration" and cfg.total_layers == 48
    assert find_stacks(model) == (("encoder.block", 24), ("decoder.block", 24))


@pytest.mark.parametrize("version", ["v1_1", "v1_0"])
@pytest.mark.parametrize(
    "adapter", ["mov", "ia3", "molora", "lora", "loramoe", "mola", "adamoe", "hydralora", "melora", "alora"]
)
def test_every_variant_runs_a_t5_and_starts_as_the_base(t5_checkpoints, version, adapter) -> None:
    """T5's FFN reads ``wo.weight`` of whatever sits there: every wrapper exposes the base's weight.
    At initialisation MoV's vectors are 1 and every LoRA B is 0, so the logits are the base's."""
    from transformers import T5ForConditionalGeneration

    from moe_lora.adapters.inject import inject_adapter
    from moe_lora.compose import load_config

    path = t5_checkpoints[version]
    extra = [] if adapter in ("mov", "ia3") else ["adapter.target_modules=[all]"]
    cfg = load_config(
        ["model.source=hub", f"model.name_or_path={path}", f"adapter={adapter}", *extra], check_files=False
    )
    model = T5ForConditionalGeneration.from_pretrained(path).eval()
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    ids, labels = torch.randint(1, 64, (2, 7)), torch.randint(1, 64, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids, labels=labels).logits
    torch.manual_seed(0)
    assert inject_adapter(model, cfg.adapter, cfg.model, cfg.layout)
    wrapped = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wrapped is not wo and wrapped.weight is wo.weight
    with torch.no_grad():
        after = model(input_ids=ids, labels=labels).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)
