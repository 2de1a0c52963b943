"""recipe.optimizer: AdamW (default) or transformers' Adafactor at a fixed, constant rate."""

from __future__ import annotations

import pytest
import torch
from transformers.optimization import Adafactor

from moe_lora.adapters.variants.alora import zero_state_slice
from moe_lora.config import RecipeConfig
from moe_lora.errors import ConfigError
from moe_lora.train.loop import init_state


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))


def _steps(state, n: int = 5, width: int = 6) -> list[float]:
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(1))
    lrs = []
    for _ in range(n):
        state.model(x).pow(2).mean().backward()
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad()
        lrs.append(state.scheduler.get_last_lr()[0])
    return lrs


def test_adafactor_is_the_mov_paper_setting_at_a_constant_rate() -> None:
    recipe = RecipeConfig(optimizer="adafactor", scheduler="constant", lr=3e-3, max_steps=5, weight_decay=0.1)
    state = init_state(_model(), recipe, seed=0)
    opt = state.optimizer
    assert isinstance(opt, Adafactor)
    assert all(not g["scale_parameter"] and not g["relative_step"] and not g["warmup_init"] for g in opt.param_groups)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]  # none on biases and vectors
    before = [p.detach().clone() for p in state.model.parameters()]
    assert _steps(state) == [3e-3] * 5
    assert all(not torch.equal(b, p) for b, p in zip(before, state.model.parameters(), strict=True))


def test_adafactor_t5x_is_the_papers_t5x_setting_with_its_factoring_rule() -> None:
    recipe = RecipeConfig(optimizer="adafactor_t5x", scheduler="constant", lr=3e-4, max_steps=3)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Linear(128, 4))  # 128x256 and 4x128
    state = init_state(model, recipe, seed=0)
    opt = state.optimizer
    assert isinstance(opt, Adafactor)
    g = opt.param_groups[0]
    assert g["scale_parameter"] and not g["relative_step"] and g["beta1"] is None
    assert (g["clip_threshold"], g["decay_rate"], g["eps"]) == (1.0, -0.8, (1e-30, 1e-3))
    assert _steps(state, 3, width=256) == [3e-4] * 3
    big, small = model[0].weight, model[1].weight
    assert "exp_avg_sq_row" in opt.state[big] and "exp_avg_sq" in opt.state[small]  # T5X: factor only >= 128
    assert all("exp_avg" not in opt.state[p] for p in (big, small))  # no momentum


def test_adamw_stays_the_default() -> None:
    state = init_state(_model(), RecipeConfig(max_steps=5), seed=0)
    assert type(state.optimizer) is torch.optim.AdamW


def test_adafactor_with_a_schedule_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"recipe\.scheduler='cosine'.*adafactor"):
        RecipeConfig(optimizer="adafactor")
    with pytest.raises(ConfigError, match=r"recipe\.scheduler='cosine'.*adafactor_t5x"):
        RecipeConfig(optimizer="adafactor_t5x")
    with pytest.raises(ConfigError, match=r"recipe\.optimizer='sgd'"):
        RecipeConfig(optimizer="sgd")


def test_zero_state_slice_reaches_adafactor_factored_statistics() -> None:
    """ALoRA's grant zeroes a B row / an A column in Adafactor's row / column statistics too."""
    w = torch.nn.Parameter(torch.randn(4, 5))
    opt = Adafactor([w], lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False)
    w.pow(2).sum().backward()
    opt.step()
    state = opt.state[w]
    zero_state_slice(opt, w, 0, 2)
    zero_state_slice(opt, w, 1, 3)
    assert state["exp_avg_sq_row"][2] == 0 and state["exp_avg_sq_row"].count_nonzero() == 3
    assert state["exp_avg_sq_col"][3] == 0 and state["exp_avg_sq_col"].count_nonzero() == 4
