"""Device and precision: float32 adapters and optimizer state under a 16-bit base, every
model.dtype x recipe.precision pair trains on the CPU, routers stay float32 under autocast."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_lora.adapters.inject import inject_adapter
from moe_lora.adapters.layer import LoRAExperts
from moe_lora.adapters.variants.loramoe import LoRAMoEConfig
from moe_lora.config import LayoutConfig, RecipeConfig
from moe_lora.data.collate import encode_examples
from moe_lora.data.example import Example
from moe_lora.errors import ConfigError
from moe_lora.routing.recorder import RoutingRecorder
from moe_lora.routing.router import Router
from moe_lora.train.loop import LoopIO, init_state, train
from moe_lora.train.precision import Precision, check_precision, make_precision, resolve_precision
from tests.adapters.test_lora_peft import MODEL_CFG

EXAMPLES = [
    Example(f"Question: what is {i} plus {i}?\nAnswer:", str(2 * i), "cbqa" if i % 3 else "instruction", "t")
    for i in range(24)
]


def tiny_run(path, model_dtype: str, precision: str, adapter_dtype: str = "float32", lr: float = 1e-3, steps: int = 3):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, model_dtype))
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    recorder = RoutingRecorder()
    cfg = LoRAMoEConfig(target_modules=["all"], num_experts=4, rank=4, dropout=0.0, dtype=adapter_dtype)
    inject_adapter(model, cfg, MODEL_CFG, LayoutConfig(), recorder)
    prec = make_precision("cpu", precision, model_dtype)
    recipe = RecipeConfig(max_steps=steps, lr=lr, batch_size=4, log_every=1, warmup_ratio=0.0, scheduler="constant")
    state = init_state(model, recipe, 0, prec)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rows: list[dict] = []
    perf = train(state, encode_examples(EXAMPLES, tok, 32), recorder, recipe, prec, LoopIO(log=rows.append))
    return model, state, start, rows, perf


@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_dtype_precision_pair_trains_on_cpu(checkpoints, model_dtype, precision) -> None:
    model, state, _, rows, perf = tiny_run(checkpoints["llama"], model_dtype, precision, steps=2)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == getattr(torch, model_dtype) for n, p in model.named_parameters() if not p.requires_grad)
    assert state.scaler.is_enabled() == (resolve_precision(precision, model_dtype) == "fp16")
    perf_rows = [r for r in rows if "tokens_per_s" in r]  # their own lines, never beside a loss
    assert [set(r) for r in perf_rows] == [{"step", "tokens_per_s", "peak_mem_bytes"}] * 2
    assert perf["tokens"] > 0 and perf["peak_mem_bytes"] > 0


def test_bf16_base_keeps_float32_adapters_and_adamw_state(checkpoints) -> None:
    """The issue's symptom: pure-bf16 AdamW at lr 2e-5 leaves most lora_A entries unchanged.
    float32 adapters move every entry; bfloat16 adapters (adapter.dtype=bfloat16) do not."""
    model, state, start, _, _ = tiny_run(checkpoints["llama"], "bfloat16", "bf16", lr=2e-5, steps=6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, n
            assert all(v.dtype == torch.float32 for v in state.optimizer.state[p].values() if v.ndim > 0), n
    changed = [(p != start[n]).float().mean().item() for n, p in model.named_parameters() if n.endswith("lora_A")]
    assert min(changed) > 0.99
    model16, _, start16, _, _ = tiny_run(checkpoints["llama"], "bfloat16", "bf16", "bfloat16", lr=2e-5, steps=6)
    changed16 = [(p != start16[n]).float().mean().item() for n, p in model16.named_parameters() if n.endswith("lora_A")]
    assert max(changed16) < 0.5  # the rounding that float32 adapters avoid


def test_router_logits_stay_float32_under_autocast() -> None:
    base = torch.nn.Linear(16, 8, bias=False).requires_grad_(False)
    layer = LoRAExperts(base, rank=4, alpha=8.0, num_experts=4, router=Router(16, 4), dtype=torch.float32)
    seen = {}
    layer.router.gate = lambda logits, dtype, _g=layer.router.gate: (
        seen.setdefault("dtype", logits.dtype) and _g(logits, dtype)
    )
    with Precision(torch.device("cpu"), "bf16").autocast():
        out = layer(torch.randn(2, 3, 16))
    assert seen["dtype"] == torch.float32 and out.dtype == torch.bfloat16


def test_precision_checks_name_the_key() -> None:
    assert resolve_precision("auto", "bfloat16") == "bf16" and resolve_precision("auto", "float32") == "fp32"
    with pytest.raises(ConfigError, match=r"adapter\.dtype=float16 with recipe\.precision=fp16"):
        check_precision("fp16", "float32", "float16", trains_base=False)
    with pytest.raises(ConfigError, match=r"recipe\.device='cuda:7'"):
        make_precision("cuda:7", "auto", "float32")
    with pytest.raises(ConfigError, match=r"recipe\.device='tpu'"):
        make_precision("tpu", "auto", "float32")
