"""The MoE base's own router (issue 32): watched through the routing recorder, trainable with the
family's load-balance loss, AdaMoE's null experts added to it; and the toy MoE world model.

Unit tests run on tiny in-memory models of the fixture families (tests/fixtures/moe.py); the CLI
tests pretrain the toy Qwen3-MoE world model once (the session's cache) and fine-tune it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from moe_lora.config import BaseMoEConfig, ModelConfig
from moe_lora.errors import ConfigError
from moe_lora.model.structure import read_structure
from moe_lora.routing.base_router import NullExpertRouter, add_null_experts, watch_base_routers
from moe_lora.routing.losses import family_load_balance_loss
from moe_lora.routing.recorder import RoutingRecorder
from tests.conftest import read_jsonl
from tests.fixtures.moe import MOE_FAMILIES, SPARSE_LAYERS, moe_config

NULL_FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


def tiny_moe(family: str, seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(moe_config(family, 64, eos_token_id=1, pad_token_id=0, **extra)).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ the loss
def test_family_load_balance_equals_transformers() -> None:
    """Pooled over layers, f summing to k, padding masked: transformers' load_balancing_loss_func."""
    torch.manual_seed(0)
    layers, b, s, e, k = 3, 2, 5, 6, 2
    logits = torch.randn(layers, b, s, e)
    mask = torch.ones(b, s)
    mask[1, 3:] = 0
    probs = logits.softmax(-1)
    selected = torch.zeros_like(probs).scatter_(-1, probs.topk(k, -1).indices, 1.0)
    ours = family_load_balance_loss(probs, selected, mask, k)
    theirs = load_balancing_loss_func(tuple(x.reshape(b * s, e) for x in logits), e, k, mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_family_load_balance_with_null_experts_averages_the_nulls() -> None:
    """AdaMoE's form: the null experts' f and P are replaced by their mean (hand-computed)."""
    probs = torch.tensor([[[[0.5, 0.1, 0.3, 0.1], [0.2, 0.2, 0.1, 0.5]]]])  # 1 layer, 1 x 2 tokens, 2 real + 2 null
    selected = torch.tensor([[[[1.0, 0, 1, 0], [0, 1, 0, 1]]]])
    mask = torch.ones(1, 2)
    f = torch.tensor([0.5, 0.5, 0.5, 0.5])  # counts / tokens (sums to k = 2); nulls 0.5 and 0.5 -> mean 0.5
    p = torch.tensor([0.35, 0.15, 0.25, 0.25])  # nulls 0.2 and 0.3 -> mean 0.25
    expected = 4 * (f * p).sum()
    torch.testing.assert_close(family_load_balance_loss(probs, selected, mask, 2, num_null=2), expected)


# ------------------------------------------------------------------------------------------ null experts
@pytest.mark.parametrize("family", NULL_FAMILIES)
def test_neg_inf_null_experts_leave_the_output_unchanged(family) -> None:
    model = tiny_moe(family)
    x = ids()
    with torch.no_grad():
        base = model(input_ids=x).logits
        for block in read_structure(model).moe:
            router = add_null_experts(model, block, 4, block.top_k, "neg_inf")
            assert isinstance(router, NullExpertRouter) and router.weight.shape[0] == block.num_experts + 4
        assert torch.equal(model(input_ids=x).logits, base)


def test_copy_init_with_doubled_top_k_picks_the_base_experts() -> None:
    """Copy init, one null per real expert and top-k doubled: each real row ties with its copy, so
    the real picks are the base's top-2 and Mixtral's renormalised weights are the base's."""
    model = tiny_moe("mixtral")
    x = ids()
    with torch.no_grad():
        base = model(input_ids=x).logits
        for block in read_structure(model).moe:
            add_null_experts(model, block, block.num_experts, 2 * block.top_k, "copy")
        torch.testing.assert_close(model(input_ids=x).logits, base, rtol=0, atol=1e-5)


def test_tokens_routed_only_to_null_experts_get_the_residual_path() -> None:
    """All picks null: the experts compute nothing (every index is the sentinel E) and the MoE
    block's output is exactly zero, so the model equals the base with its MoE blocks removed."""
    model = tiny_moe("qwen3_moe", mlp_only_layers=[])
    x = ids()
    blocks = read_structure(model).moe
    seen: list[torch.Tensor] = []
    for block in blocks:
        router = add_null_experts(model, block, 3, 2, "copy")
        router.null_offset.fill_(1.0e4)  # every token's top-2 are null experts
        model.get_submodule(block.experts).register_forward_pre_hook(lambda m, a: seen.append(a[1]))
    with torch.no_grad():
        out = model(input_ids=x).logits
        for block in blocks:
            model.get_submodule(block.path).forward = lambda h: torch.zeros_like(h)
        residual_only = model(input_ids=x).logits
    assert len(seen) == len(blocks) and all(bool((i == blocks[0].num_experts).all()) for i in seen)
    assert torch.equal(out, residual_only)


def test_null_experts_refused_where_routing_is_not_reproduced() -> None:
    model = tiny_moe("gpt_oss")
    with pytest.raises(ConfigError, match=r"model.moe.null_experts=4: the router .* of gpt_oss"):
        add_null_experts(model, read_structure(model).moe[0], 4, 4, "copy")
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ConfigError, match=r"model.moe.null_top_k=9 must be in \[1, 8\]"):
        add_null_experts(model, read_structure(model).moe[0], 4, 9, "copy")


# ------------------------------------------------------------------------------------------ recording
def record(model: nn.Module, recorder: RoutingRecorder, x: torch.Tensor, task: torch.Tensor):
    with recorder.batch(torch.ones_like(x), task):
        out = model(input_ids=x, labels=x)
    return out, recorder.pop_aux_loss()


def test_base_routers_are_recorded_like_ours() -> None:
    """CV, load per task type and entropy per base router, from the family's own choices."""
    model = tiny_moe("olmoe")
    recorder = RoutingRecorder()
    names = watch_base_routers(model, read_structure(model).moe, recorder)
    assert names == [f"model.layers.{i}.mlp.gate" for i in range(3)]
    x, task = ids(), torch.tensor([0, 1])
    _, aux = record(model, recorder, x, task)
    assert aux is None  # a frozen router adds no loss
    rows = recorder.flush(1)
    assert {(r["module"], r["task_type"]) for r in rows} == {
        (n, t) for n in names for t in ("cbqa", "instruction", "all")
    }
    gate = model.model.layers[0].mlp.gate
    with torch.no_grad():
        h = {}
        model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: h.setdefault("x", a[0]))
        model(input_ids=x)
        logits, _, chosen = gate(h["x"])
    row = next(r for r in rows if r["module"] == names[0] and r["task_type"] == "all")
    probs = logits.softmax(-1)
    assert row["load"] == torch.bincount(chosen.flatten(), minlength=4).tolist()
    torch.testing.assert_close(
        torch.tensor(row["importance"], dtype=torch.float64), probs.sum(0).double(), rtol=1e-5, atol=1e-5
    )
    assert row["entropy"] == pytest.approx(float(-(probs * probs.log()).sum(-1).mean()), rel=1e-5)
    assert row["cv"] == pytest.approx(float(probs.sum(0).std() / probs.sum(0).mean()), rel=1e-5)
    assert row["null_rate"] == 0 and row["real_experts_per_token"] == pytest.approx(2.0)


def test_trained_router_adds_the_family_loss_and_learns() -> None:
    model = tiny_moe("qwen3_moe")
    for p in model.parameters():
        p.requires_grad_(False)
    recorder = RoutingRecorder()
    blocks = read_structure(model).moe
    watch_base_routers(model, blocks, recorder, train=True, aux_weight=0.5)
    logits: list[torch.Tensor] = []
    for block in blocks:
        model.get_submodule(block.router).register_forward_hook(lambda m, a, out: logits.append(out[0]))
    x = ids()
    _, aux = record(model, recorder, x, torch.tensor([0, 1]))
    expected = 0.5 * load_balancing_loss_func(tuple(logits), 4, 2, torch.ones_like(x))
    torch.testing.assert_close(aux, expected, rtol=1e-5, atol=0)
    aux.backward()
    assert all(model.get_submodule(b.router).weight.grad.abs().sum() > 0 for b in blocks)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_family_router_is_watched_and_trained(family) -> None:
    """The six fixture families' routers (fused experts in both axis orders, a router bias, shared
    experts, dense layers) report the family's own choices and take the family loss."""
    model = tiny_moe(family)
    for p in model.parameters():
        p.requires_grad_(False)
    recorder = RoutingRecorder()
    blocks = read_structure(model).moe
    names = watch_base_routers(model, blocks, recorder, train=True)
    assert [b.layer for b in blocks] == list(SPARSE_LAYERS[family])
    _, aux = record(model, recorder, ids(), torch.tensor([0, 1]))
    aux.backward()
    rows = [r for r in recorder.flush(1) if r["task_type"] == "all"]
    assert [r["module"] for r in rows] == names and all(r["real_experts_per_token"] == 2 for r in rows)
    assert all(model.get_submodule(n).weight.grad.abs().sum() > 0 for n in names)


def test_null_rate_and_real_experts_per_token_are_recorded() -> None:
    model = tiny_moe("mixtral")
    recorder = RoutingRecorder()
    blocks = read_structure(model).moe
    watch_base_routers(model, blocks, recorder, train=True, null_experts=4, null_top_k=4, null_init="copy")
    picks: list[torch.Tensor] = []
    for block in blocks:
        model.get_submodule(block.experts).register_forward_pre_hook(lambda m, a: picks.append(a[1]))
    _, aux = record(model, recorder, ids(), torch.tensor([0, 1]))
    assert aux is not None and aux.requires_grad
    rows = {r["module"]: r for r in recorder.flush(1) if r["task_type"] == "all"}
    for block, chosen in zip(blocks, picks, strict=True):
        real = (chosen < block.num_experts).float().sum(-1)
        assert rows[block.router]["real_experts_per_token"] == pytest.approx(float(real.mean()))
        assert rows[block.router]["null_rate"] == pytest.approx(1 - float(real.mean()) / 4)


# ------------------------------------------------------------------------------------------ the toy MoE world
MOE_TINY = ["model=tiny_world_moe", "model.moe.num_experts=4", "model.moe.expert_size=32"]
ROUTERS = [f"model.layers.{i}.mlp.gate" for i in range(2)]  # conftest.TINY: 2 layers


def train(run_cli, run_dir, *args: str) -> dict:
    code, _out, err = run_cli("train", *MOE_TINY, *args, f"hydra.run.dir={run_dir}")
    assert code == 0, err
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow  # two toy MoE runs: ~6 s
def test_toy_moe_world_with_the_base_router_frozen_and_trained(run_cli, tmp_path) -> None:
    """The toy Qwen3-MoE pretrains once (cached), fine-tunes with its router frozen or trained;
    routing.jsonl holds the base routers' CV, load and entropy per task type at every log step."""
    lora = ["adapter=lora", "adapter.target_modules=[attention]"]
    frozen = train(run_cli, tmp_path / "frozen", *lora)
    trained = train(
        run_cli, tmp_path / "trained", *lora, "model.moe.train_router=true", "model.moe.router_aux_weight=0.1"
    )
    assert frozen["model"] == "tiny_world_moe"
    assert trained["params"]["trainable"] - frozen["params"]["trainable"] == 2 * 4 * 64  # 2 routers [4, 64]
    for res, run in ((frozen, "frozen"), (trained, "trained")):
        assert sorted(res["routing"]) == ROUTERS
        rows = read_jsonl(tmp_path / run / "routing.jsonl")
        tasks = ("cbqa", "instruction", "all")
        assert {(r["module"], r["task_type"]) for r in rows} == {(m, t) for m in ROUTERS for t in tasks}
        assert sorted({r["step"] for r in rows}) == [2, 4, 6]
        assert all(r["cv"] > 0 and 0 < r["entropy"] < 1.3863 and sum(r["load"]) == 2 * r["tokens"] for r in rows)
        aux = [r["aux_loss"] for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "loss" in r]
        assert all(a > 0 for a in aux) if run == "trained" else all(a == 0 for a in aux)
    assert frozen["routing"][ROUTERS[0]]["importance"] != trained["routing"][ROUTERS[0]]["importance"]


@pytest.mark.slow  # a toy MoE run: ~4 s
def test_toy_moe_world_with_null_experts(run_cli, tmp_path) -> None:
    """AdaMoE in the base router with LoRA on the experts: 4 null experts, top-4; the null rate and
    the real experts per token are recorded, and the null rows are saved with the adapter."""
    res = train(
        run_cli,
        tmp_path / "null",
        "adapter=lora",
        "model.moe.train_router=true",
        "model.moe.null_experts=4",
        "model.moe.null_top_k=4",
    )
    for module in ROUTERS:
        stats = res["routing"][module]
        assert len(stats["importance"]) == 4 and 0 < stats["null_rate"] < 1
        assert stats["real_experts_per_token"] == pytest.approx(4 * (1 - stats["null_rate"]))
    saved = load_file(str(tmp_path / "null" / "adapter_model.safetensors"))
    assert all(tuple(saved[f"{m}.weight"].shape) == (8, 64) for m in ROUTERS)  # 4 real + 4 null rows
    # moe-lora eval rebuilds the null experts and loads the trained rows: the same tuned metrics
    code, _out, err = run_cli("eval", f"run_dir={tmp_path / 'null'}", tiny=False)
    assert code == 0, err
    again = json.loads(next((tmp_path / "null").glob("eval-*[0-9].json")).read_text())
    assert again["metrics"]["instruction_em"] == res["metrics"]["instruction_em"]


def test_moe_settings_on_a_dense_model_stop_in_one_line(run_cli, tmp_path) -> None:
    code, _out, err = run_cli("train", "adapter=lora", "model.moe.train_router=true", f"hydra.run.dir={tmp_path / 'r'}")
    assert code != 0 and "model.moe.train_router=True: llama has no MoE layer" in err
    assert not (tmp_path / "r").exists()  # refused by the precheck, before any run folder


def test_model_moe_fields_that_would_change_nothing_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"model.moe.top_k=4 builds the built-in MoE .* only"):
        ModelConfig(name="m", source="hub", name_or_path="some/moe", moe=BaseMoEConfig(top_k=4))
    with pytest.raises(ConfigError, match=r"model.moe.router_aux_weight=0.1 weights the loss of a trained base router"):
        BaseMoEConfig(router_aux_weight=0.1)
    with pytest.raises(ConfigError, match=r"model.moe.null_top_k=4 needs model.moe.null_experts > 0"):
        BaseMoEConfig(null_top_k=4)
