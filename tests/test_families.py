"""Any causal LM out of the box: roles read from the model, every variant on every family.

Ten families beyond llama / qwen2 / gpt2 (tests/fixtures/checkpoints.FAMILIES), each a tiny random
checkpoint saved with ``save_pretrained``. The roles each family's linears play are written out by
hand below (read from transformers' modelling code), so these tests check moe_lora.model.structure
against an independent statement, not against itself.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moe_lora.adapters import ADAPTERS
from moe_lora.adapters.inject import inject_adapter
from moe_lora.adapters.slices import SlicedOutput
from moe_lora.routing.recorder import RoutingRecorder
from tests.conftest import first_fast

LLAMA = {
    "query": ["self_attn.q_proj"],
    "key": ["self_attn.k_proj"],
    "value": ["self_attn.v_proj"],
    "output": ["self_attn.o_proj"],
    "ffn_in": ["mlp.gate_proj", "mlp.up_proj"],
    "ffn_out": ["mlp.down_proj"],
}
ROLES = {
    "mistral": LLAMA,
    "gemma2": LLAMA,
    "qwen3": LLAMA,
    "olmo2": LLAMA,
    "phi3": {
        "query": ["self_attn.qkv_proj"],
        "key": ["self_attn.qkv_proj"],
        "value": ["self_attn.qkv_proj"],
        "output": ["self_attn.o_proj"],
        "ffn_in": ["mlp.gate_up_proj"],
        "ffn_out": ["mlp.down_proj"],
    },
    "gpt_neox": {
        "query": ["attention.query_key_value"],
        "key": ["attention.query_key_value"],
        "value": ["attention.query_key_value"],
        "output": ["attention.dense"],
        "ffn_in": ["mlp.dense_h_to_4h"],
        "ffn_out": ["mlp.dense_4h_to_h"],
    },
    "falcon": {
        "query": ["self_attention.query_key_value"],
        "key": ["self_attention.query_key_value"],
        "value": ["self_attention.query_key_value"],
        "output": ["self_attention.dense"],
        "ffn_in": ["mlp.dense_h_to_4h"],
        "ffn_out": ["mlp.dense_4h_to_h"],
    },
    "opt": {
        "query": ["self_attn.q_proj"],
        "key": ["self_attn.k_proj"],
        "value": ["self_attn.v_proj"],
        "output": ["self_attn.out_proj"],
        "ffn_in": ["fc1"],
        "ffn_out": ["fc2"],
    },
    "phi": {
        "query": ["self_attn.q_proj"],
        "key": ["self_attn.k_proj"],
        "value": ["self_attn.v_proj"],
        "output": ["self_attn.dense"],
        "ffn_in": ["mlp.fc1"],
        "ffn_out": ["mlp.fc2"],
    },
    "starcoder2": {
        "query": ["self_attn.q_proj"],
        "key": ["self_attn.k_proj"],
        "value": ["self_attn.v_proj"],
        "output": ["self_attn.o_proj"],
        "ffn_in": ["mlp.c_fc"],
        "ffn_out": ["mlp.c_proj"],
    },
}
LAYERS = {"gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers", "falcon": "transformer.h"}
FUSED_QKV = {"phi3", "gpt_neox", "falcon"}
BLOCK_ROLES = {"attention": ("query", "key", "value", "output"), "ffn": ("ffn_in", "ffn_out")}


def expected_sites(family: str, targets: list[str]) -> list[str]:
    """Layer-local module names a variant's targets name in ``family`` (every layer the same)."""
    roles = ROLES[family]
    names: list[str] = []
    for t in targets:
        for role in BLOCK_ROLES["attention"] + BLOCK_ROLES["ffn"] if t == "all" else BLOCK_ROLES.get(t, (t,)):
            names += roles[role]
    return list(dict.fromkeys(names))


def hub(family_checkpoints, family: str) -> list[str]:
    return ["model.source=hub", f"model.name_or_path={family_checkpoints[family]}"]


@pytest.fixture(scope="module")
def examples(data_root, family_checkpoints):
    from moe_lora.data.sources import first_examples
    from moe_lora.recipes.compose import load_config

    cfg = load_config(
        [
            "data=triviaqa_alpaca",
            f"data.root={data_root}",
            "model.source=hub",
            f"model.name_or_path={family_checkpoints['mistral']}",
            "adapter=none",
        ],
        check_files=False,
    )
    return first_examples(cfg.data, 2)


@pytest.fixture(scope="module")
def composed(family_checkpoints, data_root):
    """Hydra's composition for each adapter, once for all families (~0.3 s each): the families differ
    only in the string model.name_or_path, set on a copy as its command-line override would set it;
    every family's config is still built and validated (``to_config``) against its own checkpoint."""
    from moe_lora.recipes.compose import compose

    made = {}

    def get(adapter: str, family: str):
        if adapter not in made:
            args = [
                *hub(family_checkpoints, "mistral"),
                "recipe=smoke",
                "data=triviaqa_alpaca",
                f"data.root={data_root}",
            ]
            made[adapter] = compose([*args, f"adapter={adapter}"])
        dcfg = copy.deepcopy(made[adapter])
        dcfg.model.name_or_path = str(family_checkpoints[family])
        return dcfg

    return get


@pytest.mark.parametrize("family", first_fast(sorted(ROLES)))
def test_every_variant_adapts_the_methods_modules_in_every_layer_and_trains_a_step(
    family, family_checkpoints, data_root, examples, composed
) -> None:
    """Through the CLI's validation (meta-device injection, peft cross-check) of the composed config,
    the checkpoint loaded as from the hub, then the adapter and one optimiser step on real-schema rows."""
    from moe_lora.data.collate import collate
    from moe_lora.model.load import hub_model
    from moe_lora.recipes.compose import to_config

    for name in ADAPTERS:
        cfg = to_config(composed(name, family), check_files=name == "lora")
        model, tok = hub_model(cfg.model)
        names = inject_adapter(model, cfg.adapter, cfg.model, cfg.layout, RoutingRecorder())
        spec = ADAPTERS.get(name)
        if spec.wrap is not None:
            local = expected_sites(family, list(cfg.adapter.target_modules))
            layers = LAYERS.get(family, "model.layers")
            assert sorted(names) == sorted(f"{layers}.{i}.{m}" for i in range(2) for m in local), (family, name)
        if spec.slices_fused and family in FUSED_QKV:  # k and v columns only, not the query's
            fused = model.get_submodule(names[0])
            assert isinstance(fused, SlicedOutput) and set(fused.parts) == {"key", "value"}
        if spec.wrap is not None:
            assert all(n.endswith(spec.prefixes) for n, p in model.named_parameters() if p.requires_grad)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            continue
        model.train()
        batch = collate(examples, tok, 64)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        assert torch.isfinite(loss), (family, name)
        grads = [p.grad for p in trainable if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
        torch.optim.SGD(trainable, lr=1e-2).step()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "adapter"), [("phi3", "loramoe"), ("gpt_neox", "mov"), ("gemma2", "mola"), ("opt", "mov")]
)
def test_cli_train_on_other_families_records_the_targets(
    run_cli, tmp_path, family_checkpoints, data_root, family, adapter
) -> None:
    import json

    run_dir = tmp_path / "run"
    code, out, err = run_cli(
        "train",
        *hub(family_checkpoints, family),
        f"adapter={adapter}",
        "recipe=smoke",
        "data=triviaqa_alpaca",
        f"data.root={data_root}",
        "data.num_train=16",
        "recipe.eval_limit=4",
        "eval.max_new_tokens=4",
        "data.max_length=96",
        f"hydra.run.dir={run_dir}",
        tiny=False,
    )
    assert code == 0, err
    assert f"targets on {family}" in out
    res = json.loads((run_dir / "results.json").read_text())
    entries = res["targets"]["entries"]
    cfg_targets = res["adapter_config"]["target_modules"]
    assert list(entries) == cfg_targets and all(e["layers"] == 2 for e in entries.values())
    for entry, row in entries.items():
        assert row["modules"] == sorted(expected_sites(family, [entry]))
    if adapter == "mov" and family == "gpt_neox":
        assert entries["key"]["sites"]["attention.query_key_value"] == "key+value columns of fused query|key|value"
        assert entries["ffn_out"]["sites"]["mlp.dense_4h_to_h"] == "input"


def test_params_prints_the_targets_table(run_cli, family_checkpoints) -> None:
    code, out, err = run_cli("params", *hub(family_checkpoints, "phi3"), "adapter=mov", tiny=False)
    assert code == 0, err
    assert "targets on phi3 (2 layers in model.layers)" in out
    assert "self_attn.qkv_proj (key+value columns of fused query|key|value)" in out
    assert "mlp.down_proj (input)" in out


@pytest.mark.parametrize(
    ("family", "override", "expected"),
    [
        (
            "gpt_neox",
            "adapter.target_modules=[ffn_gate]",
            r"gpt_neox has no role 'ffn_gate' in layer 0 .*dense_h_to_4h",
        ),
        (
            "phi3",
            "adapter.target_modules=[gate_proj]",
            r"matched no linear module for 'gate_proj' in phi3 .*gate_up_proj",
        ),
        ("opt", "adapter.target_modules=[layers.0.fc2]", r"'layers.0.fc2' matches linears in 1 of 2 layers of opt"),
        ("phi", "model.modules.ffn=[mlp.fc1,mlp.c_fc]", r"model.modules.ffn: 'mlp.c_fc' matches no linear of phi"),
        ("gemma2", "model.attn_implementation=sdpa", r"model.attn_implementation='sdpa' cannot be used with Gemma2"),
    ],
)
def test_what_a_family_lacks_fails_in_one_line_before_anything_runs(
    run_cli, tmp_path, family_checkpoints, family, override, expected
) -> None:
    import re
    import time

    run_dir = tmp_path / "run"
    start = time.time()
    code, _out, err = run_cli(
        "train", *hub(family_checkpoints, family), "adapter=lora", override, f"hydra.run.dir={run_dir}", tiny=False
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(expected, err), err
    assert not run_dir.exists() and time.time() - start < 5
