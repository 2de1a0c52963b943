"""The MoE base's own routers: watched like ours, trainable, and AdaMoE's null experts added to them.

**Watched.** Every router of an MoE base (found by :func:`moe_lora.model.structure.find_moe`)
reports to the same :class:`~moe_lora.routing.recorder.RoutingRecorder` as moe_lora's routers, so
routing.jsonl holds its CV per layer over time, load per task type, entropy, null rate and real
experts per token with the same code. A forward hook reads what the family's router returns; in
transformers 5 every MoE family's router returns ``(logits, weights, indices)`` (the convention of
transformers' own ``OutputRecorder(..., index=0)`` for ``router_logits``): the probabilities are
``softmax(logits)`` over all experts, the choices are the family's own ``indices``. No modelling
code is copied or edited.

**Trained.** ``model.moe.train_router`` (off by default, as LLaMA-Factory freezes it) makes the
router weights trainable; the family's own load-balance loss then joins the loss through the
recorder, weighted by ``model.moe.router_aux_weight`` (default: the checkpoint's
``router_aux_loss_coef``). Its form is transformers' ``load_balancing_loss_func``: counts and
probabilities pooled over all sparse layers, ``E * sum_i f_i P_i`` with ``f`` summing to k
(:func:`moe_lora.routing.losses.family_load_balance_loss`, tested equal to transformers').

**Null experts (AdaMoE, Zeng et al. 2024, the setting its authors define).** The family's router
is replaced by :class:`NullExpertRouter`: ``N`` new outputs that select a null expert (output zero,
no FLOPs), top-k raised to ``model.moe.null_top_k``. A null pick is passed to the family's experts
module as the sentinel index ``E`` with weight 0, which every transformers 5 experts
implementation skips (eager: ``if expert_idx == num_experts: continue``; grouped_mm: sentinel rows
sorted past the last group, masked under ``_is_expert_parallel``, which is set here; moe_lora's
LoRA on the experts skips them too), so the expert FLOPs of a token are its real picks' (the
recorded ``real_experts_per_token`` equals the rows the experts module computes, tested). The
chosen real experts' weights follow the family's own rule applied to the real picks only
(renormalised among themselves where the family renormalises, ``norm_topk_prob`` / Mixtral, as a
public AdaMoE Mixtral patch does); a token whose picks are all null gets a zero MoE output, so the
layer passes the residual stream through (plus any shared expert; tested). The load-balance loss
covers real and null experts with the null experts' load and probability averaged over the nulls
(the form of moe_lora's ``adamoe`` variant, our reading of the paper: the loss balances the real
experts and the null *group*). That public patch differs: it does not average the nulls and
counts their picks over padding too.

Initialisation of the new rows (``model.moe.null_init``):

- ``copy`` (the default; the issue's account of the authors' code; the public patch above adds
  a second bias-free gate for the nulls instead): null row ``j`` copies real row ``j mod E``.
  Each null then ties with a real expert, so routing changes at init wherever top-k breaks those
  ties (with ``N = E`` and top-k doubled, the real picks stay the base's top-k: tested on Mixtral;
  with the authors' ``N = 2E`` and top-4, a token's second real expert competes with the first's
  two copies, so the output changes at init).
- ``neg_inf``: zero rows plus a constant offset of -1e4 on the null logits, the float32
  equivalent of minus infinity (their softmax probability is exactly 0 against any real logit
  above -9900). With the base's top-k the model's output is the base's, bit for bit (tested).
  The nulls then get zero gradient and are never chosen: a control, not a way to learn them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_lora.config import NULL_INITS, BaseMoEConfig
from moe_lora.errors import ConfigError
from moe_lora.model.structure import MoEBlock, read_structure
from moe_lora.routing.losses import AuxLossConfig

# families whose router forward NullExpertRouter reproduces (softmax, top-k, norm_topk_prob / Mixtral's renorm)
NULL_FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
NEG_INF = -1.0e4  # float32's minus infinity for a softmax: exp(-1e4 - l) underflows to 0 for l > -9900


class BaseRouterTap:
    """What the recorder needs to know of a base router (the attributes of ``routing.Router``)."""

    def __init__(self, num_experts: int, top_k: int, num_null: int = 0) -> None:
        self.num_experts, self.top_k, self.num_null = num_experts, top_k, num_null
        self.expert_type = torch.zeros(num_experts, dtype=torch.long)  # one group: group_share is 1
        self.module_name = ""
        self.stream = "input"
        self.recorder: Any = None
        self.aux: AuxLossConfig | None = None

    def report(self, logits: torch.Tensor, probs: torch.Tensor, selected: torch.Tensor) -> None:
        if self.recorder is not None and self.recorder.active:
            self.recorder.record(self, logits, probs, selected)

    def hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook on a family router: ``(logits, weights, indices)`` -> probabilities and the
        family's own choices (a router returning only logits: their top-k)."""
        if self.recorder is None or not self.recorder.active:
            return
        logits = output[0] if isinstance(output, tuple) else output
        probs = torch.softmax(logits.float(), -1)
        indices = output[2] if isinstance(output, tuple) and len(output) > 2 else None
        if indices is None or indices.dtype.is_floating_point:
            indices = probs.detach().topk(self.top_k, -1).indices
        selected = torch.zeros_like(probs).scatter_(-1, indices.reshape(*probs.shape[:-1], -1), 1.0)
        self.recorder.record(self, logits, probs, selected)


class NullExpertRouter(nn.Module):
    """A softmax top-k family router with ``num_null`` null outputs appended (AdaMoE).

    ``weight`` is ``[E + N, H]`` (the real rows first, under the family router's parameter name);
    forward returns the family's ``(logits, weights, indices)`` with null picks as index ``E``
    (the experts module's sentinel) and weight 0."""

    def __init__(self, router: nn.Module, num_null: int, top_k: int, init: str) -> None:
        super().__init__()
        real = router.weight.detach()
        e, h = real.shape
        if init == "copy":
            rows = real[torch.arange(num_null, device=real.device) % e].clone()
        else:
            rows = torch.zeros(num_null, h, dtype=real.dtype, device=real.device)
        self.weight = nn.Parameter(torch.cat([real, rows]), requires_grad=router.weight.requires_grad)
        # added to the null logits: -inf-equivalent under neg_inf, else 0 (a test sets it to force null picks)
        offset = torch.full((num_null,), NEG_INF if init == "neg_inf" else 0.0, device=real.device)
        self.register_buffer("null_offset", offset, persistent=False)
        self.num_experts, self.num_null, self.top_k = e, num_null, top_k
        self.hidden_dim = h
        self.norm_topk_prob = bool(getattr(router, "norm_topk_prob", True))
        self.init = init
        self.tap = BaseRouterTap(e, top_k, num_null)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)
        e = self.num_experts
        # the real logits as the family computes them (the same GEMM shape: bit for bit), then the nulls'
        nulls = F.linear(x, self.weight[e:]) + self.null_offset.to(x.dtype)
        real_logits = F.linear(x, self.weight[:e])
        logits = torch.cat([real_logits, nulls], -1)
        probs = torch.softmax(logits, -1, dtype=torch.float32)
        # where the nulls' probability underflows to 0 (neg_inf), the real experts' probabilities are
        # the family's own softmax over them (equal in exact arithmetic; bit for bit with this)
        own = torch.softmax(real_logits, -1, dtype=torch.float32)
        unused = probs[:, e:].sum(-1, keepdim=True) == 0
        probs = torch.cat([torch.where(unused, own, probs[:, :e]), probs[:, e:]], -1)
        top, indices = probs.topk(self.top_k, -1)
        real = indices < self.num_experts
        weights = top * real
        if self.norm_topk_prob:  # the family's renormalisation, over the chosen real experts only
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        self.tap.report(logits, probs, torch.zeros_like(probs).scatter_(-1, indices, 1.0))
        sentinel = torch.full_like(indices, self.num_experts)
        return logits, weights.to(logits.dtype), torch.where(real, indices, sentinel)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, null={self.num_null}, top_k={self.top_k}, init={self.init}"


def null_router_check(family: str, block: MoEBlock, router: nn.Module, num_null: int, top_k: int) -> None:
    """Null experts replace a router whose forward is known to be softmax -> top-k -> (optional)
    renormalisation, with one bias-free row per expert (:data:`NULL_FAMILIES`); any other router
    (gpt-oss's top-k before softmax with a bias, DeepSeek's scaled group routing) fails in one line."""
    weight = getattr(router, "weight", None)
    if (
        family not in NULL_FAMILIES
        or weight is None
        or tuple(weight.shape)[:1] != (block.num_experts,)
        or block.router_bias
    ):
        raise ConfigError(
            f"model.moe.null_experts={num_null}: the router {block.router} of {family} ({type(router).__name__} "
            f"{list(block.router_shape)}{', with a bias' if block.router_bias else ''}) is not one whose "
            f"routing moe_lora reproduces; null experts are added to the routers of {', '.join(NULL_FAMILIES)}"
        )
    if not 1 <= top_k <= block.num_experts + num_null:
        raise ConfigError(
            f"model.moe.null_top_k={top_k} must be in [1, {block.num_experts + num_null}] "
            f"({block.num_experts} experts + {num_null} null experts)"
        )


def add_null_experts(model: nn.Module, block: MoEBlock, num_null: int, top_k: int, init: str) -> NullExpertRouter:
    """Replace ``block``'s router by a :class:`NullExpertRouter` in place; returns it."""
    router = model.get_submodule(block.router)
    family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    null_router_check(family, block, router, num_null, top_k)
    experts = model.get_submodule(block.experts)
    # transformers' experts module (its @use_experts_implementation __init__ sets the flag below), or
    # moe_lora's LoRA on the experts wrapping one (adapters/experts.py: it skips picks >= E itself)
    base = experts if "_is_expert_parallel" in vars(experts) else getattr(experts, "base", None)
    if base is None or "_is_expert_parallel" not in vars(base):
        raise ConfigError(
            f"model.moe.null_experts={num_null}: the experts module {block.experts} is a "
            f"{type(experts).__name__}, not one of transformers' @use_experts_implementation modules that "
            "skip the null experts' sentinel index"
        )
    # transformers' grouped_mm / batched_mm forwards mask the sentinel index E (rows left uninitialised
    # by the kernel: NaN * 0 otherwise) only under this flag; it changes nothing else (transformers
    # 5: integrations/moe.py, deepgemm.py, finegrained_fp8.py read it for the sentinel mask alone)
    base._is_expert_parallel = True
    new = NullExpertRouter(router, num_null, top_k, init).train(router.training)
    parent, _, child = block.router.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return new


def family_aux_weight(model: nn.Module, weight: float | None) -> float:
    """``model.moe.router_aux_weight``, else the checkpoint's ``router_aux_loss_coef`` (0.001 in
    transformers' Qwen3-MoE, 0.01 OLMoE, 0.02 Mixtral), else 0.01."""
    if weight is not None:
        return weight
    config = getattr(model, "config", None)
    coef = getattr(config, "router_aux_loss_coef", None) if config is not None else None
    return float(coef) if coef is not None else 0.01


def watch_base_routers(
    model: nn.Module,
    blocks: tuple[MoEBlock, ...],
    recorder: Any,
    *,
    train: bool = False,
    aux_weight: float | None = None,
    null_experts: int = 0,
    null_top_k: int | None = None,
    null_init: str = "copy",
) -> list[str]:
    """Attach every base router of ``blocks`` to ``recorder`` (after adapter injection, which
    freezes the base): null experts added first where asked, weights trainable with ``train``,
    the family's load-balance loss switched on for trained routers. Returns the routers' names."""
    if null_init not in NULL_INITS:
        raise ConfigError(f"model.moe.null_init={null_init!r} must be one of {', '.join(NULL_INITS)}")
    aux = AuxLossConfig(lb_weight=family_aux_weight(model, aux_weight), lb_form="family") if train else None
    names = []
    for block in blocks:
        if block.router is None:
            raise ConfigError(f"the MoE block {block.path} has no router moe_lora can read: it cannot be watched")
        top_k = block.top_k or 1
        if null_experts:
            router = add_null_experts(model, block, null_experts, null_top_k or top_k, null_init)
            tap = router.tap
        else:
            router = model.get_submodule(block.router)
            tap = BaseRouterTap(block.num_experts, top_k)
            router.register_forward_hook(tap.hook)
        if train:
            router.weight.requires_grad_(True)
        if recorder is not None:
            recorder.attach(tap, block.router, aux or AuxLossConfig())
        names.append(block.router)
    return names


def attach_base_routers(
    model: nn.Module, moe: BaseMoEConfig, recorder: Any, blocks: tuple[MoEBlock, ...] | None = None
) -> list[str]:
    """``model.moe`` applied to ``model`` after adapter injection (which freezes the base): every
    base router watched, and trained or given null experts as configured. ``blocks``: the MoE
    blocks read before injection (an expert adapter wraps the experts module, which the structure
    reader then no longer sees as fused experts). A dense model watches nothing; asking it to
    train its router or add null experts fails in one line (no silent no-op)."""
    blocks = read_structure(model).moe if blocks is None else blocks
    if not blocks:
        for key, value in (("train_router", moe.train_router), ("null_experts", moe.null_experts)):
            if value:
                family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
                raise ConfigError(f"model.moe.{key}={value}: {family} has no MoE layer (no router to act on)")
        return []
    return watch_base_routers(
        model,
        blocks,
        recorder,
        train=moe.train_router,
        aux_weight=moe.router_aux_weight,
        null_experts=moe.null_experts,
        null_top_k=moe.null_top_k,
        null_init=moe.null_init,
    )
