"""Mixture-of-experts bases: the structure reader finds routers, routed and shared experts and dense
layers of six families (tests/fixtures/moe.py), and no target ever adapts a silent subset of an
MoE layer's FFN: every registered variant either adapts exactly what it names or stops in one line
before anything is written. LoRA adapts the fused routed experts (every expert of every sparse
layer, with the counts peft's ``target_parameters`` gives), and so does IA3; the other variants
refuse targets that include them, naming the expert tensors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moe_lora.adapters.inject import inject_adapter, plan_targets
from moe_lora.config import ModelConfig
from moe_lora.errors import ConfigError
from moe_lora.model.structure import read_structure
from moe_lora.recipes.compose import CONF_DIR, load_config
from moe_lora.train.checkpoint import set_adapter
from tests.fixtures.moe import MOE_FAMILIES, SPARSE_LAYERS, make_moe_checkpoint, moe_config

# family -> (router, routed expert tensors with their axis order, shared experts, shared-expert gate)
EXPECTED = {
    "mixtral": ("gate", {"gate_up_proj": "[E, out, in]", "down_proj": "[E, out, in]"}, None, None),
    "olmoe": ("gate", {"gate_up_proj": "[E, out, in]", "down_proj": "[E, out, in]"}, None, None),
    "qwen2_moe": (
        "gate",
        {"gate_up_proj": "[E, out, in]", "down_proj": "[E, out, in]"},
        "shared_expert",
        "shared_expert_gate",
    ),
    "qwen3_moe": ("gate", {"gate_up_proj": "[E, out, in]", "down_proj": "[E, out, in]"}, None, None),
    "deepseek_v2": ("gate", {"gate_up_proj": "[E, out, in]", "down_proj": "[E, out, in]"}, "shared_experts", None),
    "gpt_oss": ("router", {"gate_up_proj": "[E, in, out]", "down_proj": "[E, in, out]"}, None, None),
}
VARIANTS = sorted(p.stem for p in (CONF_DIR / "adapter").glob("*.yaml") if p.stem not in ("none", "full"))


@pytest.fixture(scope="session")
def moe_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_checkpoints")
    return {family: make_moe_checkpoint(family, root / family) for family in MOE_FAMILIES}


def meta(path: Path) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_structure_reader_finds_the_moe_blocks(family, moe_checkpoints) -> None:
    structure = read_structure(meta(moe_checkpoints[family]))
    router, tensors, shared, shared_gate = EXPECTED[family]
    assert structure.sparse_layers == list(SPARSE_LAYERS[family])
    assert structure.dense_layers == [i for i in range(3) if i not in SPARSE_LAYERS[family]]
    for block in structure.moe:
        mlp = f"model.layers.{block.layer}.mlp"
        assert (block.path, block.num_experts, block.top_k) == (mlp, 4, 2)
        assert block.router == f"{mlp}.{router}" and block.router_shape == (4, 32)
        assert block.router_bias == (family == "gpt_oss")
        assert {t.name: t.order for t in block.tensors} == {f"{mlp}.experts.{n}": o for n, o in tensors.items()}
        assert {t.role for t in block.tensors} == {"expert_gate_up", "expert_down"}
        assert all((t.bias is not None) == (family == "gpt_oss") for t in block.tensors)
        assert block.shared == (f"{mlp}.{shared}" if shared else None)
        assert block.shared_gate == (f"{mlp}.{shared_gate}" if shared_gate else None)
        parts = {li.local: li.part for li in structure.in_layer(block.layer) if li.part}
        expected = {f"mlp.{shared}.{p}": "shared" for p in ("gate_proj", "up_proj", "down_proj")} if shared else {}
        expected |= {f"mlp.{shared_gate}": "shared_gate"} if shared_gate else {}
        assert parts == expected
    for layer in structure.dense_layers:  # a dense layer's MLP is the plain FFN
        assert {li.local: li.roles for li in structure.in_layer(layer) if li.block == "ffn"} == {
            "mlp.gate_proj": ("ffn_in", "ffn_gate"),
            "mlp.up_proj": ("ffn_in", "ffn_up"),
            "mlp.down_proj": ("ffn_out",),
        }


def adapter_configs() -> dict:
    """Every registered variant's default AdapterConfig (composed once, on the built-in model)."""
    return {v: load_config([f"adapter={v}"], check_files=False).adapter for v in VARIANTS}


@pytest.fixture(scope="module")
def adapters() -> dict:
    return adapter_configs()


def expert_tensors(family: str, names: tuple[str, ...] = ("gate_up_proj", "down_proj")) -> set[str]:
    return {f"model.layers.{i}.mlp.experts.{n}" for i in SPARSE_LAYERS[family] for n in names}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_no_variant_adapts_a_silent_subset(family, moe_checkpoints, adapters) -> None:
    """Default targets: LoRA's ``ffn`` is every FFN linear plus every routed expert tensor of every
    sparse layer, IA3's ``ffn_out`` every expert ``down_proj`` too; the others are refused in one
    line naming the routed expert tensors, or adapt attention only (MELoRA's query/value).
    ``[attention]``: exactly the attention linears of every layer."""
    model = meta(moe_checkpoints[family])
    structure = read_structure(model)
    attention = {li.name for li in structure.linears if li.block == "attention"}
    assert {li.layer for li in structure.linears if li.name in attention} == {0, 1, 2}
    model_cfg = ModelConfig(source="hub", name_or_path=str(moe_checkpoints[family]))
    for name, adapter in adapters.items():
        try:
            _, sites = plan_targets(model, adapter, model_cfg)
        except ConfigError as exc:
            msg = str(exc)
            assert "\n" not in msg and name != "lora", (name, msg)
            # a role the family lacks (DeepSeek's latent attention has no key) fails before the FFN
            names_experts = "experts.gate_up_proj [" in msg or "experts.down_proj [" in msg
            assert names_experts or "no role" in msg, (name, msg)
            if names_experts:
                assert f"adapter={name} cannot adapt" in msg and "adapter.target_modules=[attention]" in msg
        else:
            if name == "lora":  # ffn: the dense FFNs, the shared experts and every routed expert tensor
                ffn = {li.name for li in structure.linears if li.block == "ffn"}
                assert {s.name for s in sites} == ffn | expert_tensors(family), [s.name for s in sites]
                continue
            if name == "ia3":  # key, value, ffn_out: every expert down_proj among them
                assert {s.name for s in sites if s.expert} == expert_tensors(family, ("down_proj",))
                continue
            assert {s.block for s in sites} == {"attention"}, (name, [s.name for s in sites])
        try:
            _, sites = plan_targets(model, replace(adapter, target_modules=["attention"]), model_cfg)
        except ConfigError as exc:  # MELoRA's minis must divide DeepSeek's latent widths: said so
            assert name == "melora" and "num_minis" in str(exc), str(exc)
            continue
        assert {s.name for s in sites} == attention, name


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_moe_targets(family, moe_checkpoints, adapters) -> None:
    """For LoRA: ``shared_experts`` is exact; ``experts``, the expert roles, the FFN roles and a
    module name that is also a fused expert tensor select exactly the routed expert tensors they
    name (plus the linears); ``router`` fails in one line. IA3 adapts them too, but not half of a
    fused gate|up; LoRAMoE refuses every entry that includes a routed expert tensor, naming it and
    the dense layers."""
    model = meta(moe_checkpoints[family])
    model_cfg = ModelConfig(source="hub", name_or_path=str(moe_checkpoints[family]))
    lora = adapters["lora"]
    shared = EXPECTED[family][2]
    shared_linears = {
        f"model.layers.{i}.mlp.{shared}.{p}"
        for i in SPARSE_LAYERS[family]
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    dense = [i for i in range(3) if i not in SPARSE_LAYERS[family]]
    dense_down = {f"model.layers.{i}.mlp.down_proj" for i in dense}
    shared_down = {n for n in shared_linears if n.endswith("down_proj")}
    for targets, expected in [
        (["shared_experts"], shared_linears),
        (["experts"], expert_tensors(family)),
        (["expert_down"], expert_tensors(family, ("down_proj",))),
        (["expert_gate_up"], expert_tensors(family, ("gate_up_proj",))),
        (["ffn_out"], dense_down | shared_down | expert_tensors(family, ("down_proj",))),
        (["down_proj"], dense_down | shared_down | expert_tensors(family, ("down_proj",))),
    ]:
        _, sites = plan_targets(model, replace(lora, target_modules=targets), model_cfg)
        assert {s.name for s in sites} == expected, targets
        assert all((s.expert is not None) == (".experts." in s.name) for s in sites)
    with pytest.raises(ConfigError, match="no adapter variant adapts the base model's router") as info:
        plan_targets(model, replace(lora, target_modules=["router"]), model_cfg)
    for targets in (["ffn"], ["experts"], ["expert_down"], ["down_proj"], ["attention", "ffn_out"]):
        with pytest.raises(ConfigError) as info:
            plan_targets(model, replace(adapters["loramoe"], target_modules=targets), model_cfg)
        msg = str(info.value)
        assert "adapter=loramoe cannot adapt" in msg and "experts.down_proj [" in msg and "\n" not in msg, msg
        assert f"layers {dense} are dense" in msg, msg
    _, sites = plan_targets(model, replace(adapters["ia3"], target_modules=["ffn_in"]), model_cfg)
    assert {s.name for s in sites if s.expert} == expert_tensors(family, ("gate_up_proj",))
    with pytest.raises(ConfigError, match=r"adapter=ia3 would scale the whole fused .*gate_up_proj"):
        plan_targets(model, replace(adapters["ia3"], target_modules=["ffn_gate"]), model_cfg)


def test_shared_experts_on_a_family_without_them(moe_checkpoints, adapters) -> None:
    model = meta(moe_checkpoints["mixtral"])
    model_cfg = ModelConfig(source="hub", name_or_path=str(moe_checkpoints["mixtral"]))
    with pytest.raises(ConfigError, match="mixtral has no shared experts in sparse layer 0"):
        plan_targets(model, replace(adapters["lora"], target_modules=["shared_experts"]), model_cfg)


def test_dense_model_has_no_moe_targets(checkpoints, adapters) -> None:
    model = meta(checkpoints["llama"])
    model_cfg = ModelConfig(source="hub", name_or_path=str(checkpoints["llama"]))
    assert read_structure(model).moe == ()
    with pytest.raises(ConfigError, match="targets mixture-of-experts layers, but llama has none"):
        plan_targets(model, replace(adapters["lora"], target_modules=["experts"]), model_cfg)


class _Expert(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(hidden, inner), nn.Linear(hidden, inner), nn.Linear(inner, hidden)


class _Layer(nn.Module):
    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(hidden, hidden))
        self.block_sparse_moe = nn.Module()
        self.block_sparse_moe.gate = nn.Linear(hidden, experts, bias=False)
        self.block_sparse_moe.experts = nn.ModuleList(_Expert(hidden, 2 * hidden) for _ in range(experts))


class _ListMoE(nn.Module):
    """Older checkpoints and remote code: a ModuleList of per-expert MLPs and a Linear router."""

    _no_split_modules = ("_Layer",)

    def __init__(self) -> None:
        super().__init__()
        self.config = moe_config("mixtral", 100, num_hidden_layers=2)
        self.layers = nn.ModuleList(_Layer(32, 4) for _ in range(2))


def test_per_expert_module_list(adapters) -> None:
    """Per-expert Linears are adaptable: ``ffn`` and ``experts`` select every one of them, never
    the router; the router Linear is not an FFN projection."""
    model = _ListMoE()
    structure = read_structure(model)
    assert structure.sparse_layers == [0, 1] and not structure.moe[0].fused
    assert structure.moe[0].router == "layers.0.block_sparse_moe.gate"
    experts = {
        f"layers.{i}.block_sparse_moe.experts.{e}.{w}" for i in (0, 1) for e in range(4) for w in ("w1", "w2", "w3")
    }
    model_cfg = ModelConfig(source="hub", name_or_path="list_moe")
    for targets in (["ffn"], ["experts"]):
        _, sites = plan_targets(model, replace(adapters["lora"], target_modules=targets), model_cfg)
        assert {s.name for s in sites} == experts, targets
    _, sites = plan_targets(model, replace(adapters["lora"], target_modules=["expert_down"]), model_cfg)
    assert {s.name for s in sites} == {n for n in experts if n.endswith("w2")}


def test_latent_attention_with_fewer_kv_heads_fails_in_one_line(tmp_path) -> None:
    """The DeepSeek-V2 traceback: latent attention expands keys to every head, so a config with
    fewer key/value heads fails on the first forward inside transformers; here it is one line."""
    moe_config("deepseek_v2", 100, num_key_value_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"set num_key_value_heads=4 in config\.json"):
        load_config(["model.source=hub", f"model.name_or_path={tmp_path}"], check_files=False)


def test_cli_refuses_loramoe_and_params_counts_experts_as_peft(moe_checkpoints, run_cli, tmp_path) -> None:
    """``train`` with LoRAMoE's default targets: one line naming the expert tensors, nothing written;
    ``params`` with LoRA on ``[experts]`` prints the MoE layers and peft's trainable count for
    ``target_parameters=[experts.gate_up_proj, experts.down_proj]`` at the same rank."""
    path = moe_checkpoints["qwen2_moe"]
    run = tmp_path / "run"
    code, out, err = run_cli(
        "train", "model.source=hub", f"model.name_or_path={path}", "adapter=loramoe", f"hydra.run.dir={run}", tiny=False
    )
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "Traceback" not in out + err, err[-2000:]
    assert "model.layers.1.mlp.experts.down_proj [4, 32, 16]" in lines[0] and "adapter=loramoe cannot" in lines[0]
    assert not run.exists()
    code, out, err = run_cli(
        "params", "model.source=hub", f"model.name_or_path={path}", "adapter=lora", "adapter.target_modules=[experts]"
    )
    assert code == 0, err[-2000:]
    assert "MoE: sparse layers [1]; dense layers [0, 2]; 4 routed experts" in out
    assert "router gate [4, 32], shared experts shared_expert (gate shared_expert_gate)" in out
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path),
        LoraConfig(
            r=8, lora_alpha=8, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
        ),
    )
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert f"trainable: {trainable:,} (" in out, out[-600:]


def one_step(data_root, run) -> list[str]:
    """One smoke training step on the tiny real-schema data, with a one-row evaluation."""
    return [
        "data=triviaqa_alpaca",
        f"data.root={data_root}",
        "recipe=smoke",
        "recipe.threads=1",
        "recipe.max_steps=1",
        "data.num_train=4",
        "recipe.eval_limit=1",
        "eval.max_new_tokens=2",
        f"hydra.run.dir={run}",
    ]


def test_lora_on_experts_trains_saves_and_loads(moe_checkpoints, run_cli, data_root, tmp_path) -> None:
    """A smoke step of ``adapter=lora adapter.target_modules=[experts]`` on gpt-oss ([E, in, out]
    experts with biases): every routed expert tensor of every sparse layer is adapted, the trained
    per-expert factors are saved in adapter.safetensors and load back into a fresh injection."""
    run, path = tmp_path / "run", moe_checkpoints["gpt_oss"]
    overrides = ["model.source=hub", f"model.name_or_path={path}", "adapter=lora", "adapter.target_modules=[experts]"]
    code, _out, err = run_cli("train", *overrides, *one_step(data_root, run), tiny=False)
    assert code == 0, err[-3000:]
    targets = json.loads((run / "results.json").read_text())["targets"]
    row = targets["entries"]["experts"]
    assert row["layers"] == 3 and row["modules"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    saved = load_file(next(run.rglob("adapter.safetensors")))
    assert set(saved) == {
        f"model.layers.{i}.mlp.experts.lora.{p}.lora_{ab}"
        for i in SPARSE_LAYERS["gpt_oss"]
        for p in ("gate_up_proj", "down_proj")
        for ab in "AB"
    }
    assert saved["model.layers.0.mlp.experts.lora.down_proj.lora_A"].shape == (64, 4 * 8)  # (d_in, E*r)
    assert all(saved[n].abs().sum() > 0 for n in saved if n.endswith("lora_B"))  # B left 0 after a step
    cfg = load_config(overrides, check_files=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    inject_adapter(model, cfg.adapter, cfg.model, cfg.layout)
    set_adapter(model, saved, "adapter.safetensors")
    torch.testing.assert_close(
        model.model.layers[2].mlp.experts.lora["gate_up_proj"].lora_B.detach(),
        saved["model.layers.2.mlp.experts.lora.gate_up_proj.lora_B"],
    )


def test_deepseek_v2_trains_attention_only(moe_checkpoints, run_cli, data_root, tmp_path) -> None:
    """The one real run: a smoke step on DeepSeek-V2 (latent attention, dense first layer, shared
    experts), attention only; the adapted modules are every attention linear of every layer."""
    run = tmp_path / "run"
    code, _out, err = run_cli(
        "train",
        "model.source=hub",
        f"model.name_or_path={moe_checkpoints['deepseek_v2']}",
        "adapter=lora",
        "adapter.target_modules=[attention]",
        *one_step(data_root, run),
        tiny=False,
    )
    assert code == 0, err[-3000:]
    targets = json.loads((run / "results.json").read_text())["targets"]
    row = targets["entries"]["attention"]
    assert row["layers"] == 3 and row["modules"] == [
        "self_attn.kv_a_proj_with_mqa",
        "self_attn.kv_b_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
    ]
    assert set(targets["entries"]) == {"attention"} and targets["moe"]["sparse_layers"] == [1, 2]


# Families beyond the fixtures, read on the meta device only: another block name, a nested router
# and shared experts under another name, and experts stored where no MoE block is recognised.
OTHER = {"granitemoe": ("block_sparse_moe", "router", None), "hunyuan_v1_moe": ("mlp", "gate.wg", "shared_mlp")}


@pytest.mark.parametrize("family", [*OTHER, "jetmoe"])
def test_other_families_on_the_meta_device(family, adapters) -> None:
    config = AutoConfig.for_model(
        family,
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        num_experts=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        moe_topk=2,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    structure = read_structure(model)
    model_cfg = ModelConfig(source="hub", name_or_path=family)
    if family == "jetmoe":  # 3-D expert weights outside any block read: the FFN is refused, not half-adapted
        assert structure.moe == () and structure.unread_experts
        with pytest.raises(ConfigError, match="would miss expert parameters"):
            plan_targets(model, replace(adapters["lora"], target_modules=["ffn"]), model_cfg)
        return
    block_name, router, shared = OTHER[family]
    assert structure.sparse_layers == [0, 1]
    block = structure.moe[0]
    assert block.path == f"model.layers.0.{block_name}" and block.router == f"{block.path}.{router}"
    assert block.shared == (f"{block.path}.{shared}" if shared else None) and block.fused
    _, sites = plan_targets(model, replace(adapters["lora"], target_modules=["all"]), model_cfg)
    assert {s.name for s in sites if s.expert} == {
        f"{b.experts}.{n}" for b in structure.moe for n in ("gate_up_proj", "down_proj")
    }
    with pytest.raises(ConfigError, match="adapter=loramoe cannot adapt"):
        plan_targets(model, replace(adapters["loramoe"], target_modules=["all"]), model_cfg)
