"""MoV (Zadouri et al. 2023): IA3 experts with soft merging, ``h' = h * sum_e p_e(h) v_e``.

Every ``v_e`` starts at 1 (identity at init). The router's input is the activation it rescales.
The site rule (:func:`routed_width`): per head only where the vector is made of heads, the outputs of
the attention's query, key and value projections: one router shared across the heads reads one
head's slice, so ``router.weight`` is (E, head_dim). Everywhere else (the FFN's gate and up outputs,
the attention output projection, a linear targeted by name that plays no head role) one router reads
the whole vector, so ``router.weight`` is (E, width): FFN columns are never cut into blocks of the
head size. For the FFN's default site it routes on the intermediate
activation that enters the FFN's output projection (``ffn_out``: down_proj, fc2, ...), or with
``adapter.ffn_route_on=activation`` on the FFN's activation ``act(wi_0 x)`` (the paper's T5 site:
for a gated FFN the router then reads the activation before the gate product). On a fused
q|k|v linear (Phi-3's ``qkv_proj``, GPT-NeoX's ``query_key_value``) the key and value columns get a
router and experts each, exactly as the unfused twin's k_proj and v_proj (a fused gate|up slice is
routed whole, as the unfused gate_proj and up_proj are). Defaults: E=10, soft routing, router in
fp32, sites k_proj and v_proj outputs and down_proj input. The schema is :class:`RoutedConfig`'s,
without the low-rank fields (rank, alpha, dropout, init_A) or null experts and grouped compute,
which IA3 experts do not have: setting one fails at composition instead of being ignored. The
paper trains with Adafactor at a constant rate: ``recipe.optimizer=adafactor
recipe.scheduler=constant`` (the MoV arms set it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List

import torch
from torch import nn

from moe_lora.adapters.base import LayerPlan, register_adapter
from moe_lora.adapters.layer import WrapsLinear, linear_dims
from moe_lora.adapters.slices import SlicedOutput
from moe_lora.config import RoutedConfig
from moe_lora.errors import ConfigError
from moe_lora.model.structure import is_encoder_decoder
from moe_lora.routing.router import Router


@dataclass
class MoVConfig(RoutedConfig):
    name: str = "mov"
    target_modules: List[str] = field(default_factory=lambda: ["key", "value", "ffn_out"])
    num_experts: int = 10
    # what the FFN site's router reads: input (the activation entering ffn_out, gate x up for a gated
    # FFN: the causal-LM site, down_proj's input), activation (the FFN's activation module's output,
    # act(wi_0 x): the paper's T5 site), auto (activation on encoder-decoders, else input)
    ffn_route_on: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ffn_route_on not in ("auto", "input", "activation"):
            raise ConfigError(f"adapter.ffn_route_on={self.ffn_route_on!r} must be auto, input or activation")


HEAD_ROLES = ("query", "key", "value")  # the outputs that are made of attention heads


def routed_width(roles: tuple[str, ...] | list[str], dim: int, head_dim: int) -> int:
    """How many columns one router reads on a ``dim``-wide output playing ``roles``: a head
    (``head_dim``) where every role is a query, key or value projection, else the whole vector."""
    return head_dim if roles and set(roles) <= set(HEAD_ROLES) else dim


class MoVScale(nn.Module):
    """IA3 experts ``ia3_v`` (E, dim) merged by a router on the activation they rescale, per group
    of ``head_dim`` columns (one router shared by the groups): a head on query/key/value outputs,
    the whole vector (``head_dim == dim``) elsewhere (:func:`routed_width`)."""

    def __init__(self, dim: int, head_dim: int, router: Router, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.router, self.dim, self.head_dim = router, dim, head_dim
        if dim % head_dim:
            raise ConfigError(
                f"adapter=mov routes the output of a {dim}-wide linear per head, but the model's "
                f"head size {head_dim} does not divide it (model.head_dim)"
            )
        self.ia3_v = nn.Parameter(torch.ones(router.num_experts, dim, dtype=dtype, device=device))

    def _rescale(self, h: torch.Tensor) -> torch.Tensor:
        heads = h.unflatten(-1, (self.dim // self.head_dim, self.head_dim))  # (..., H, hd)
        gate = self.router(heads).to(h.dtype)  # (..., H, E): one router shared by the heads
        vectors = self.ia3_v.unflatten(-1, (self.dim // self.head_dim, self.head_dim))  # (E, H, hd)
        scale = torch.einsum("...he,ehd->...hd", gate, vectors.to(h.dtype))
        return (heads * scale).flatten(-2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._rescale(h)


class MoVLinear(MoVScale, WrapsLinear):
    """A base linear with :class:`MoVScale` on its input (FFN output projection) or its output;
    ``width`` is the columns one router reads (:func:`routed_width`; the whole input when scaling it)."""

    def __init__(
        self, base: nn.Module, router: Router, scale_input: bool, width: int, dtype: torch.dtype | None = None
    ) -> None:
        d_in, d_out = linear_dims(base)
        dim = d_in if scale_input else d_out
        super().__init__(dim, dim if scale_input else width, router, dtype or base.weight.dtype, base.weight.device)
        self.base, self.scale_input = base, scale_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_input:
            return self.base(self._rescale(x))
        return self._rescale(self.base(x))


class MoVActivationRouted(MoVLinear):
    """MoV on the input of ``ffn_out`` with the router reading the FFN's activation ``act(g)``
    (``adapter.ffn_route_on=activation``). Scaling elementwise commutes with the gate product and
    dropout, so ``wo(s * (act(g) * u))`` is ``wo((s * act(g)) * u)``: the paper's site exactly, with
    the activation captured by a forward hook on the sibling activation module."""

    def __init__(self, base: nn.Module, router: Router, dtype: torch.dtype | None = None) -> None:
        d_in, _d_out = linear_dims(base)
        super().__init__(base, router, True, d_in, dtype)
        self._act: torch.Tensor | None = None

    def on_inject(self, parent: nn.Module, name: str) -> None:
        acts = [m for m in parent.children() if is_activation(m)]
        if len(acts) != 1:
            raise ConfigError(
                f"adapter.ffn_route_on=activation: {name}'s FFN has {len(acts)} activation modules "
                f"({[type(m).__name__ for m in acts]}), not one; use adapter.ffn_route_on=input"
            )
        acts[0].register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self._act = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act, self._act = self._act, None
        if act is None or act.shape != x.shape:
            raise RuntimeError(
                "adapter.ffn_route_on=activation: the FFN's activation did not run just before its output "
                "projection (or has another width); this FFN needs adapter.ffn_route_on=input"
            )
        gate = self.router(act).to(x.dtype)  # (..., E) on act(wi_0 x)
        scale = gate @ self.ia3_v.to(x.dtype)
        return self.base(x * scale)


def is_activation(module: nn.Module) -> bool:
    """An activation function module (transformers' ``ACT2FN`` classes or torch's)."""
    kind = type(module).__module__
    return not any(True for _ in module.parameters()) and (
        kind.startswith("transformers.activations") or kind.startswith("torch.nn.modules.activation")
    )


def _router(cfg: MoVConfig, plan: LayerPlan, dim: int, device: torch.device) -> Router:
    return Router(
        dim,
        plan.num_experts,
        top_k=plan.top_k,
        jitter=cfg.router_jitter,
        fp32=cfg.router_fp32,
        init=cfg.router_init,
        device=device,
        dtype=plan.dtype,
    )


def for_model(cfg: MoVConfig, model: nn.Module) -> MoVConfig:
    """``ffn_route_on=auto`` is the paper's T5 site (``activation``) on an encoder-decoder, the
    causal-LM site (``input``) elsewhere: resolved once per model, before any linear is wrapped."""
    if cfg.ffn_route_on == "auto":
        return replace(cfg, ffn_route_on="activation" if is_encoder_decoder(model) else "input")
    return cfg


@register_adapter("mov", MoVConfig, slices_fused=True, prefixes=("ia3_v", "router.weight"), prepare=for_model)
def wrap_mov(base: nn.Module, cfg: MoVConfig, plan: LayerPlan) -> nn.Module:
    device = base.weight.device
    site = plan.site
    if site.partial:  # k and v of a fused q|k|v (or gate, up of a gate|up): one router and expert set per role
        columns = {r: site.fused.columns(r) for r in site.targeted}
        widths = {r: routed_width((r,), len(c), plan.head_dim) for r, c in columns.items()}
        parts = {
            r: MoVScale(len(c), widths[r], _router(cfg, plan, widths[r], device), plan.dtype, device)
            for r, c in columns.items()
        }
        return SlicedOutput(base, parts, columns)
    d_in, d_out = linear_dims(base)
    scale_input = site.input_site  # peft's feedforward_modules: the input of ffn_out
    width = d_in if scale_input else routed_width(site.roles, d_out, plan.head_dim)
    router = _router(cfg, plan, width, device)
    if scale_input and cfg.ffn_route_on == "activation":
        return MoVActivationRouted(base, router, dtype=plan.dtype)
    return MoVLinear(base, router, scale_input, width, dtype=plan.dtype)
