"""Parameter accounting on the meta device matches the authors' released code exactly, and every
model family in conf/model injects where its module names say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_lora.adapters.inject import inject_adapter
from moe_lora.adapters.variants.lora import LoRAConfig
from moe_lora.config import LayoutConfig
from moe_lora.model.load import arch_config
from moe_lora.recipes.compose import CONF_DIR, load_config


def _numbers(out: str, key: str) -> int:
    return int(re.search(rf"{key}: ([\d,]+)", out).group(1).replace(",", ""))


@pytest.mark.parametrize(
    ("args", "trainable", "without_routers"),
    [
        (["model=llama2_7b", "adapter=mola", "adapter.num_experts=5", "layout=inverted_triangle"], 105_635_840, None),
        (["model=llama2_7b", "adapter=hydralora"], 18_284_544, 15_826_944),
    ],
)
def test_params_match_released_code_for_llama2_7b(run_cli, args, trainable, without_routers) -> None:
    code, out, err = run_cli("params", *args, tiny=False)
    assert code == 0, err
    assert "6,738,415,616 base parameters" in out
    assert _numbers(out, "trainable") == trainable
    if without_routers is not None:
        assert _numbers(out, "without routers") == without_routers
    if "layout=inverted_triangle" in args:  # the per-layer table: 2 experts low, 8 high
        assert re.search(r"model\.layers\.0\.self_attn\.q_proj\s+0\s+2\s", out)
        assert re.search(r"model\.layers\.31\.mlp\.down_proj\s+31\s+8\s", out)


# decoder-only configs; the encoder-decoders' (T5) twin is in tests/test_seq2seq.py
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if "architecture: seq2seq" not in p.read_text())


@pytest.mark.parametrize("name", MODELS)
def test_random_two_layer_model_of_each_family_injects_every_decoder_linear(name: str) -> None:
    # adapter=lora: the default loramoe stops in one line on an MoE base's fused experts (tested elsewhere)
    cfg = load_config([f"model={name}", "model.num_layers=2", "adapter=lora"], check_files=False).model
    heads = cfg.num_heads
    small = {"hidden_size": 8 * heads, "intermediate_size": 64, "num_layers": 2}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(arch_config(cfg, vocab_size=64, **small))
    layer_linears = [
        n
        for n, m in model.named_modules()  # roles are detected: every linear of a layer
        if ".1." in n and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
    ]
    layer_linears += [  # an MoE layer's fused routed experts: one site, the experts module
        n for n, m in model.named_modules() if ".1." in n and any(p.dim() == 3 for p in m.parameters(recurse=False))
    ]
    names = inject_adapter(model, LoRAConfig(target_modules=["all"]), cfg, LayoutConfig())
    assert len(names) == 2 * len(layer_linears) and all(
        n in names and n.replace(".1.", ".0.") in names for n in layer_linears
    )
    x = torch.randint(0, 64, (1, 5))
    assert model(x).logits.shape == (1, 5, 64)
    assert Path(CONF_DIR / "model" / f"{name}.yaml").read_text().count("hidden_size") == 1
