"""Encoder-decoders (T5) on the meta device: the MoV paper's parameter counts from conf/model, and
tiny random T5 checkpoints (v1.1 gated and v1.0 `wi`) adapted in both stacks, self- and
cross-attention alike; seq2seq batches, loss and the encode-once choice scoring of rank
classification (P3 runs end to end: tests/test_p3.py)."""

from __future__ import annotations

import re

import pytest
import torch

from tests.conftest import first_fast


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


@pytest.mark.parametrize("size", ["large", "xl", "xxl"])
def test_t5_model_configs_build_on_the_meta_device_with_both_stacks(size) -> None:
    from moe_lora.model.load import meta_model
    from moe_lora.model.structure import find_stacks
    from moe_lora.recipes.compose import load_config

    cfg = load_config([f"model=t5_v1_1_lm_adapt_{size}"], check_files=False).model
    model = meta_model(cfg)
    assert type(model).__name__ == "T5ForConditionalGeneration" and cfg.total_layers == 48
    assert find_stacks(model) == (("encoder.block", 24), ("decoder.block", 24))


@pytest.mark.parametrize("version", ["v1_1", "v1_0"])
@pytest.mark.parametrize(
    "adapter", first_fast(["mov", "ia3", "molora", "lora", "loramoe", "mola", "adamoe", "hydralora", "melora", "alora"])
)
def test_every_variant_runs_a_t5_and_starts_as_the_base(t5_checkpoints, version, adapter) -> None:
    """T5's FFN reads ``wo.weight`` of whatever sits there: every wrapper exposes the base's weight.
    At initialisation MoV's vectors are 1 and every LoRA B is 0, so the logits are the base's."""
    from transformers import T5ForConditionalGeneration

    from moe_lora.adapters.inject import inject_adapter
    from moe_lora.recipes.compose import load_config

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


@pytest.fixture(scope="module")
def t5_with_tokenizer(tmp_path_factory):
    from tests.fixtures.checkpoints import make_t5_checkpoint

    return make_t5_checkpoint(tmp_path_factory.mktemp("t5tok") / "t5")


def test_seq2seq_batches_put_the_prompt_in_the_source_and_the_answer_in_the_labels(t5_with_tokenizer) -> None:
    from transformers import AutoTokenizer

    from moe_lora.data.collate import IGNORE, collate, encode_examples
    from moe_lora.data.example import Example

    tok = AutoTokenizer.from_pretrained(t5_with_tokenizer)
    exs = [
        Example("Q: what is the capital?", "paris", "cbqa", "x"),
        Example("A long prompt " * 20, "no", "instruction", "y"),
    ]
    batch = collate(exs, tok, (32, 8))
    eos = tok.eos_token_id
    src0 = tok(exs[0].prompt, add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, : len(src0) + 1].tolist() == [*src0, eos]  # prompt + EOS, nothing in front
    assert batch["input_ids"].shape[1] == 32 and batch["input_ids"][1, -1] == eos  # cut from the right, EOS kept
    tgt0 = tok("paris", add_special_tokens=False)["input_ids"][:5]
    assert batch["labels"][0, : len(tgt0) + 1].tolist() == [*tgt0, eos] and (batch["labels"] == IGNORE).any()
    assert batch["attention_mask"][0].sum() == len(src0) + 1
    encoded = encode_examples(exs, tok, (32, 8))
    assert encoded.seq2seq and encoded.truncated == 1
    for key, value in encoded.batch([0, 1]).items():
        torch.testing.assert_close(value, batch[key])


def test_seq2seq_loss_matches_t5s_own_and_sequence_normalisation_averages_sequences(t5_with_tokenizer) -> None:
    from transformers import T5ForConditionalGeneration

    from moe_lora.data.collate import IGNORE
    from moe_lora.train.loss import batch_loss

    model = T5ForConditionalGeneration.from_pretrained(t5_with_tokenizer).eval()
    ids = torch.randint(3, 60, (3, 7))
    labels = torch.randint(3, 60, (3, 5))
    labels[0, 2:] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        own = model(input_ids=ids, labels=labels).loss  # T5's mean over label tokens
        token = batch_loss(model, model.config, batch, seq2seq=True)
        seq = batch_loss(model, model.config, batch, seq2seq=True, normalization="sequence")
        logits = model(input_ids=ids, labels=labels).logits
    torch.testing.assert_close(token, own)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    per_row = ce.sum(1) / (labels != IGNORE).sum(1)
    torch.testing.assert_close(seq, per_row.mean())
    assert not torch.allclose(seq, token)


def test_choices_are_scored_with_one_encoding_per_example_and_equal_pairwise_scoring(t5_with_tokenizer) -> None:
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from moe_lora.data.collate import collate
    from moe_lora.data.example import Example
    from moe_lora.eval.metrics import answer_logprobs, choice_logprobs

    tok = AutoTokenizer.from_pretrained(t5_with_tokenizer)
    model = T5ForConditionalGeneration.from_pretrained(t5_with_tokenizer).eval()
    exs = [
        Example("it rains. Does it follow?", "yes", "instruction", "rte", choices=("yes", "no"), template="a"),
        Example(
            "the cat sleeps. Question: a dog runs?", "Maybe", "instruction", "anli", choices=("Yes", "Maybe", "No")
        ),
    ]
    calls = []
    handle = model.get_encoder().register_forward_hook(
        lambda m, a, k, o: calls.append(k["input_ids"].shape[0]), with_kwargs=True
    )
    scores = choice_logprobs(model, tok, exs, (32, 8), batch_size=16)
    handle.remove()
    assert calls == [2]  # one encoder row per example, not per choice
    for ex, row in zip(exs, scores, strict=True):
        pairs = [Example(ex.prompt, c, "instruction", "x") for c in ex.choices]
        logp, rows = answer_logprobs(model, collate(pairs, tok, (32, 8)))
        want = torch.zeros(len(pairs)).index_add_(0, rows, logp)
        torch.testing.assert_close(torch.tensor(row), want, rtol=1e-5, atol=1e-5)


def test_routers_of_the_decoder_are_masked_with_the_target_tokens(t5_with_tokenizer) -> None:
    from transformers import T5ForConditionalGeneration

    from moe_lora.adapters.inject import inject_adapter
    from moe_lora.recipes.compose import load_config
    from moe_lora.routing.recorder import RoutingRecorder
    from moe_lora.train.loss import batch_loss

    cfg = load_config(["model.source=hub", f"model.name_or_path={t5_with_tokenizer}", "adapter=mov"], check_files=False)
    model = T5ForConditionalGeneration.from_pretrained(t5_with_tokenizer)
    rec = RoutingRecorder()
    inject_adapter(model, cfg.adapter, cfg.model, cfg.layout, rec)
    streams = {n: r.stream for n, r in rec.routers.items()}
    assert streams["encoder.block.0.layer.0.SelfAttention.k"] == "input"
    assert streams["decoder.block.0.layer.1.EncDecAttention.v"] == "input"  # cross-attention reads the encoder
    assert streams["decoder.block.0.layer.0.SelfAttention.k"] == "target"
    assert streams["decoder.block.0.layer.2.DenseReluDense.wo"] == "target"
    ids, mask = torch.randint(3, 60, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    labels = torch.randint(3, 60, (2, 4))
    labels[0, 3:] = -100
    with rec.batch(mask, torch.tensor([0, 1]), (labels != -100).long()):
        batch_loss(model, model.config, {"input_ids": ids, "attention_mask": mask, "labels": labels}, seq2seq=True)
    rows = {(r["module"], r["task_type"]): r for r in rec.flush(1)}
    heads = cfg.model.num_heads or 4
    assert rows[("encoder.block.0.layer.0.SelfAttention.k", "all")]["tokens"] == 15 * heads  # 9 + 6 real source tokens
    assert rows[("decoder.block.0.layer.1.EncDecAttention.k", "all")]["tokens"] == 15 * heads
    assert rows[("decoder.block.0.layer.0.SelfAttention.k", "all")]["tokens"] == 7 * heads  # 3 + 4 target tokens
    assert rows[("decoder.block.0.layer.2.DenseReluDense.wo", "all")]["tokens"] == 7


@pytest.mark.parametrize("gated", [True, False])
def test_movs_ffn_site_equals_a_hand_written_router_on_the_activation(tmp_path, gated) -> None:
    """The paper's FFN site: h = act(wi_0 x), p = softmax(W_r h) in float32, s = sum_e p_e v_e, and
    the FFN's output wo((s * h) * wi_1 x) (v1.0: wo(s * act(wi x))); routers initialised N(0, 0.02^2)."""
    from transformers import T5ForConditionalGeneration

    from moe_lora.adapters.inject import inject_adapter
    from moe_lora.recipes.compose import load_config
    from tests.fixtures.checkpoints import make_t5_checkpoint

    path = make_t5_checkpoint(tmp_path / "t5", gated=gated)
    cfg = load_config(
        [
            "model.source=hub",
            f"model.name_or_path={path}",
            "adapter=mov",
            "adapter.num_experts=3",
            "adapter.ffn_route_on=activation",
            "adapter.router_init=normal",
        ],
        check_files=False,
    )
    model = T5ForConditionalGeneration.from_pretrained(path).eval()
    torch.manual_seed(0)
    inject_adapter(model, cfg.adapter, cfg.model, cfg.layout)
    ffn = model.decoder.block[1].layer[2].DenseReluDense
    assert 0.01 < float(ffn.wo.router.weight.std()) < 0.03  # N(0, 0.02^2)
    default = load_config(["model.source=hub", f"model.name_or_path={path}", "adapter=mov"], check_files=False)
    assert default.adapter.ffn_route_on == "auto"  # activation on an encoder-decoder: the paper's site
    plain = T5ForConditionalGeneration.from_pretrained(path)
    inject_adapter(plain, default.adapter, default.model, default.layout)
    assert type(plain.decoder.block[1].layer[2].DenseReluDense.wo) is type(ffn.wo)
    with torch.no_grad():
        ffn.wo.ia3_v.normal_(1.0, 0.5)
        ffn.wo.router.weight.normal_(0.0, 1.0)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        h = ffn.act(ffn.wi_0(x) if gated else ffn.wi(x))
        p = torch.softmax(h.float() @ ffn.wo.router.weight.T.float(), -1)
        s = p @ ffn.wo.ia3_v
        want = ffn.wo.base((s * h) * ffn.wi_1(x) if gated else s * h)
        got = ffn(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_routing_layers_count_the_encoder_first_and_stacks_are_reported_apart() -> None:
    from moe_lora.recipes.results import by_stack
    from moe_lora.report.telemetry import layer_indices

    modules = ["decoder.block.0.layer.0.SelfAttention.k", "encoder.block.1.layer.0.SelfAttention.k"]
    modules += ["encoder.block.0.layer.1.DenseReluDense.wo", "decoder.block.2.layer.2.DenseReluDense.wo", "lm_head"]
    assert layer_indices(modules) == {
        "encoder.block.0.layer.1.DenseReluDense.wo": 0,
        "encoder.block.1.layer.0.SelfAttention.k": 1,
        "decoder.block.0.layer.0.SelfAttention.k": 2,
        "decoder.block.2.layer.2.DenseReluDense.wo": 4,
    }
    assert layer_indices(["model.layers.3.mlp.down_proj"]) == {"model.layers.3.mlp.down_proj": 3}
    routing = {m: {"cv": cv, "entropy": 1.0} for m, cv in zip(modules[:4], [0.1, 0.3, 0.2, 0.5], strict=True)}
    stacks = by_stack(routing)
    assert stacks["encoder.block"]["cv"] == pytest.approx(0.25) and stacks["decoder.block"]["cv"] == pytest.approx(0.3)
