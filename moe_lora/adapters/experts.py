"""Per-expert LoRA on the fused routed experts of an MoE base, with the base's own routing.

transformers 5 stores an MoE layer's routed experts as fused 3-D parameters in one experts module
(``gate_up_proj`` and ``down_proj``, ``[E, out, in]``; gpt-oss ``[E, in, out]`` with per-expert
biases) behind one calling convention, ``experts(hidden (T, d), top_k_index (T, k), top_k_weights
(T, k))``, and flags that say how to compute it (``has_gate``, ``has_bias``, ``is_transposed``,
``_apply_gate``, ``act_fn``: the ``@use_experts_implementation`` interface, whose ``grouped_mm``,
``batched_mm`` and eager forwards all compute the same function). :class:`LoRAOnExperts` replaces
that module with one more forward of the same interface that adds, for every expert ``e`` and every
targeted projection ``P``, its own low-rank update::

    P_e(x) = W_e x + b_e + (alpha / r) B_e A_e dropout(x)

inside the expert (LoRA on ``gate_up`` acts before the activation, LoRA on ``down`` before the
routing weight), exactly where peft's ``target_parameters`` puts it: peft adds ``(alpha / r) B_e A_e``
to every expert's weight and runs the base forward on ``W + dW``. The router is not touched: the
block calls it, and hands its choices and weights to this module as it did to the base experts.

How it is computed, and how it differs from peft. The (token, choice) pairs are sorted by expert
once; the base projections run as grouped GEMMs over them (transformers' own ``_grouped_linear``,
so the base numbers are its ``grouped_mm`` forward's), and each adapter's ``B_e A_e x`` is added to
its projection's rows for the chosen experts only: through the CSR kernels of
:mod:`moe_lora.adapters.csr` on the CPU (each pair a row with one expert: no per-expert step) and
grouped GEMMs elsewhere. Nothing loops over experts in Python and no ``E x out x in`` delta is ever
formed; peft materialises ``W + dW`` for all E experts on every forward (and its gradient in the
backward), so its cost and memory grow with E, ours with the chosen pairs (top-k). Dropout works here
(on the adapter's input); peft refuses ``lora_dropout`` on parameters, since ``W + dW`` cannot drop
inputs of one term only.

Parameters, per projection, in the layout of :class:`moe_lora.adapters.layer.LoRAExperts`:
``lora_A`` ``(d_in, E*r)`` and ``lora_B`` ``(E*r, d_out)``, expert ``e`` owning columns / rows
``e*r .. e*r+r-1``. peft's are ``lora_A.weight (E*r, d_in)`` (expert-major rows, the transpose of
ours) and ``lora_B.weight (d_out, r*E)`` with rank-major columns (column ``j*E + e``): see
:func:`from_peft`. ``d_in`` is the input of the projection whichever axis order the base stores
(peft swaps its in/out the same way), so trainable counts are equal for equal ranks.

Rank per expert: ``adapter.expert_rank`` (:func:`expert_rank`); by default each expert gets the
adapter's rank r, as peft's ``target_parameters`` does with ``r`` (E*r per projection in all);
``rank/num_experts`` is peft's advice to keep the total at r's.

The same forward carries other per-expert parametrisations (:class:`AdaptedExperts`, one part per
projection with ``pre``/``post``/``fold_``): IA3 (:class:`IA3OnExperts`) scales each expert's
``down_proj`` input and ``gate_up_proj`` output (with its bias) by the expert's own vector, as
peft's IA3 does per linear (peft has no IA3 on parameters to compare with). Picks of null experts
(index ``num_experts``) add nothing. Merging folds every part into the fused tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers.integrations import moe as hf_moe

from moe_lora.adapters.csr import csr_update_
from moe_lora.adapters.layer import kaiming_uniform_
from moe_lora.errors import ConfigError

# the interface's attributes this forward reads (transformers' @use_experts_implementation sets them)
INTERFACE = ("has_gate", "has_bias", "is_transposed", "_apply_gate")


def check_expert_rank(setting: str | int) -> None:
    """``adapter.expert_rank`` is ``rank``, ``rank/num_experts`` or a positive integer."""
    setting = str(setting).strip()
    if setting not in ("rank", "rank/num_experts") and not (setting.isdigit() and int(setting) >= 1):
        raise ConfigError(f"adapter.expert_rank={setting!r}: use 'rank', 'rank/num_experts' or a positive integer")


def expert_rank(setting: str | int, rank: int, num_experts: int) -> int:
    """Each expert's rank from ``adapter.expert_rank``: ``rank`` (the adapter's r, the default),
    ``rank/num_experts`` (peft's advice: E experts of r/E keep the projection's total at r), or a
    number."""
    check_expert_rank(setting)
    setting = str(setting).strip()
    if setting == "rank":
        return rank
    if setting == "rank/num_experts":
        if rank % num_experts:
            raise ConfigError(
                f"adapter.expert_rank=rank/num_experts: adapter.rank={rank} is not a multiple of the "
                f"{num_experts} routed experts; set adapter.rank to one, or adapter.expert_rank to a number"
            )
        return rank // num_experts
    return int(setting)


class ExpertLoRA(nn.Module):
    """``A_e``, ``B_e`` of every expert of one fused projection, concatenated over experts."""

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        d_out: int,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        init_A: str = "kaiming",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.d_in, self.d_out, self.rank = num_experts, d_in, d_out, rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(d_in, num_experts * rank, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts * rank, d_out, dtype=dtype, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init_A == "normal":
            if self.lora_A.device.type != "meta":
                nn.init.normal_(self.lora_A, 0.0, 0.02)
        else:
            kaiming_uniform_(self.lora_A, d_in)

    def update_(self, out: torch.Tensor, x: torch.Tensor, expert: torch.Tensor, offsets: torch.Tensor, kernel: str):
        """``out[i] += s B_e(i) A_e(i) dropout(x[i])`` for pair rows sorted by expert ``expert``
        (``offsets``: each expert's end row, for the grouped GEMM)."""
        x = self.lora_dropout(x)
        if kernel == "csr":  # each pair a CSR row with one expert's r columns; weight 1
            ones = x.new_ones(x.shape[0], 1, dtype=self.lora_A.dtype)
            csr_update_(out, x, ones, expert.unsqueeze(-1), self.lora_A, self.lora_B, self.num_experts, self.scaling)
            return
        on = torch.is_autocast_enabled(x.device.type)
        dt = torch.get_autocast_dtype(x.device.type) if on else self.lora_A.dtype
        A = self.lora_A.to(dt).view(self.d_in, self.num_experts, self.rank).transpose(0, 1)  # (E, d_in, r)
        B = self.lora_B.to(dt).view(self.num_experts, self.rank, self.d_out)
        h = hf_moe._grouped_mm(x.to(dt), A, offsets) * self.scaling
        out.add_(hf_moe._grouped_mm(h, B, offsets).to(out.dtype))

    def pre(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        return x

    def post(self, out: torch.Tensor, x: torch.Tensor, expert: torch.Tensor, offsets: torch.Tensor, kernel: str):
        self.update_(out, x, expert, offsets, kernel)
        return out

    def fold_(self, w: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> None:
        """``W_e += s B_e A_e`` in the base's axis order (float32, then the weight's dtype)."""
        A = self.lora_A.float().view(self.d_in, self.num_experts, self.rank).transpose(0, 1)  # (E, d_in, r)
        B = self.lora_B.float().view(self.num_experts, self.rank, self.d_out)
        delta = self.scaling * torch.bmm(A, B)  # (E, d_in, d_out): x @ delta_e is the update
        delta = delta if transposed else delta.transpose(1, 2)
        w.copy_((w.float() + delta.to(w.device)).to(w.dtype))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}"


class ExpertIA3(nn.Module):
    """IA3 per expert: ``l_e`` (ones at init) scales expert e's projection output (``W_e x + b_e``),
    or its input where the projection is the FFN output (``down``: peft's ``feedforward_modules``)."""

    def __init__(self, num_experts: int, dim: int, *, scale_input: bool, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.num_experts, self.scale_input = num_experts, scale_input
        self.ia3_l = nn.Parameter(torch.ones(num_experts, dim, dtype=dtype, device=device))

    def scales(self, expert: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.ia3_l.index_select(0, expert.clamp(max=self.num_experts - 1)).to(dtype)  # null picks: masked

    def pre(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        return x * self.scales(expert, x.dtype) if self.scale_input else x

    def post(self, out: torch.Tensor, x: torch.Tensor, expert: torch.Tensor, offsets: torch.Tensor, kernel: str):
        return out if self.scale_input else out * self.scales(expert, out.dtype)

    def fold_(self, w: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> None:
        """Scale each expert's input columns or output rows (and its bias) in the base's axis order."""
        l = self.ia3_l.float().to(w.device)  # noqa: E741 -- IA3's name for the vector
        in_axis = 1 if transposed else 2
        axis = in_axis if self.scale_input else 3 - in_axis
        w.copy_((w.float() * l.unsqueeze(3 - axis)).to(w.dtype))
        if bias is not None and not self.scale_input:
            bias.copy_((bias.float() * l).to(bias.dtype))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, {'input' if self.scale_input else 'output'}={self.ia3_l.shape[1]}"


class AdaptedExperts(nn.Module):
    """A transformers experts module (``self.base``, frozen) with a per-expert adapter on some of
    its fused projections (:attr:`parts`, by the base's parameter name; stored under ``slot``).
    Same call and result shape as the base. Each part may change a projection's input (``pre``)
    and its output (``post``) for the chosen pairs, and fold itself into the base (``fold_``)."""

    slot = "parts"

    def __init__(self, base: nn.Module, where: str = "") -> None:
        super().__init__()
        check_interface(base, where)
        self.base = base
        self.num_experts = base.num_experts
        self.add_module(self.slot, nn.ModuleDict())
        # how adapter pairs are computed: "csr" or "grouped_mm"; None: by the input's device (tests set it)
        self.kernel: str | None = None

    @property
    def parts(self) -> nn.ModuleDict:
        return self._modules[self.slot]

    def projection(self, name: str, where: str) -> tuple[int, int, torch.Tensor]:
        """``(d_in, d_out, weight)`` of a fused projection, whichever axis order the base stores."""
        base, weight = self.base, getattr(self.base, name, None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 3 or name not in self.order():
            raise ConfigError(
                f"{where or type(base).__name__}: {name!r} is not a fused expert projection of "
                f"{type(base).__name__} (its projections: {', '.join(self.order())})"
            )
        _e, a, b = weight.shape
        return (a, b, weight) if base.is_transposed else (b, a, weight)

    def order(self) -> tuple[str, str]:
        """The input projection (``gate_up_proj``, or ``up_proj`` without a gate) and ``down_proj``."""
        return ("gate_up_proj" if self.base.has_gate else "up_proj", "down_proj")

    def __getattr__(self, name: str):
        """The base's attributes (``gate_up_proj``, ``num_experts``, ``config``...) stay readable."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def kernel_for(self, x: torch.Tensor) -> str:
        if self.kernel is not None:
            return self.kernel
        return "csr" if x.device.type == "cpu" and not torch.compiler.is_compiling() else "grouped_mm"

    def project(self, name: str, x: torch.Tensor, expert: torch.Tensor, offsets: torch.Tensor, kernel: str):
        """One projection of the sorted pairs: the base's grouped linear, plus the adapter's pairs."""
        base = self.base
        bias = getattr(base, f"{name}_bias")[expert.clamp(max=self.num_experts - 1)] if base.has_bias else None
        part = getattr(self.parts, name, None)
        x_in = part.pre(x, expert) if part is not None else x
        out = hf_moe._grouped_linear(x_in, getattr(base, name), offsets, bias=bias, is_transposed=base.is_transposed)
        return part.post(out, x, expert, offsets, kernel) if part is not None else out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Picks of index ``num_experts`` or more (null experts added to a base router, as the
        eager forward skips them) sort last, past the grouped GEMMs' last offset: their rows are
        masked to 0 on the way in (so no gradient leaves them) and on the way out."""
        base = self.base
        tokens, k = top_k_index.shape
        expert, order = top_k_index.reshape(-1).sort(stable=True)  # pairs grouped by expert
        counts = torch.bincount(expert, minlength=self.num_experts)[: self.num_experts]
        offsets = counts.cumsum(0, dtype=torch.int32)
        null = (expert >= self.num_experts).unsqueeze(-1)
        x = hidden_states.index_select(0, order // k).masked_fill(null, 0.0)
        kernel = self.kernel_for(hidden_states)
        first, down = self.order()
        h = self.project(first, x, expert, offsets, kernel)
        h = base._apply_gate(h) if base.has_gate else base.act_fn(h)
        y = self.project(down, h, expert, offsets, kernel)
        if getattr(base, "has_post_expert_norm", False):
            y = base.post_expert_norm(y)
        y = y.masked_fill(null, 0.0) * top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1)
        # back to (token, choice) order and summed over the k choices, as transformers does
        # (deterministic, unlike index_add_ on CUDA; accumulates in the weights' dtype)
        unsorted = torch.empty_like(y).index_copy_(0, order, y)
        return unsorted.view(tokens, k, -1).sum(1).to(hidden_states.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base with every expert's update folded into its fused tensors (peft's merge)."""
        base = self.base
        for name, part in self.parts.items():
            part.fold_(getattr(base, name), getattr(base, f"{name}_bias", None), base.is_transposed)
        return base

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, adapted={list(self.parts)}"


class LoRAOnExperts(AdaptedExperts):
    """Per-expert LoRA (:class:`ExpertLoRA`) on the projections in ``self.lora``."""

    slot = "lora"

    def __init__(
        self,
        base: nn.Module,
        projections: Iterable[str],
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        init_A: str = "kaiming",
        dtype: torch.dtype | None = None,
        where: str = "",
    ) -> None:
        super().__init__(base, where)
        self.rank = rank
        for name in projections:
            d_in, d_out, weight = self.projection(name, where)
            self.parts[name] = ExpertLoRA(
                self.num_experts,
                d_in,
                d_out,
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                init_A=init_A,
                dtype=dtype or weight.dtype,
                device=weight.device,
            )


class IA3OnExperts(AdaptedExperts):
    """Per-expert IA3 (:class:`ExpertIA3`) on the projections in ``self.ia3``: the input of
    ``down_proj``, the output of the others (a fused gate|up scaled whole)."""

    slot = "ia3"

    def __init__(
        self, base: nn.Module, projections: Iterable[str], *, dtype: torch.dtype | None = None, where: str = ""
    ) -> None:
        super().__init__(base, where)
        for name in projections:
            d_in, d_out, weight = self.projection(name, where)
            scale_input = name == "down_proj"
            self.parts[name] = ExpertIA3(
                self.num_experts,
                d_in if scale_input else d_out,
                scale_input=scale_input,
                dtype=dtype or weight.dtype,
                device=weight.device,
            )


def lora_on_experts(experts: nn.Module, cfg, plan, projections: list[str], where: str) -> LoRAOnExperts:
    """LoRA's ``wrap_experts``: the experts module of one sparse layer with per-expert LoRA on
    ``projections``; the rank per expert from ``adapter.expert_rank`` and the layer's plan."""
    rank = expert_rank(getattr(cfg, "expert_rank", "rank"), plan.rank, experts.num_experts)
    return LoRAOnExperts(
        experts,
        projections,
        rank=rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        init_A=cfg.init_A,
        dtype=plan.dtype,
        where=where,
    )


def ia3_on_experts(experts: nn.Module, cfg, plan, projections: list[str], where: str) -> IA3OnExperts:
    """IA3's ``wrap_experts``: per-expert scaling vectors on ``projections`` of one sparse layer."""
    return IA3OnExperts(experts, projections, dtype=plan.dtype, where=where)


def merge_experts(model: nn.Module) -> list[str]:
    """Fold every :class:`AdaptedExperts` of ``model`` into its base and put the base back; returns
    their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, AdaptedExperts)]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, model.get_submodule(name).merged())
    return names


def check_interface(base: nn.Module, where: str = "") -> None:
    """Only transformers' experts interface is computed here: anything else is refused, naming it."""
    missing = [a for a in (*INTERFACE, "num_experts") if not hasattr(base, a)]
    if missing:
        raise ConfigError(
            f"{where or 'experts'}: cannot adapt the routed experts of {type(base).__name__}: it is not a "
            f"transformers experts module (@use_experts_implementation; lacks {', '.join(missing)})"
        )
    if getattr(base, "_is_expert_parallel", False):
        raise ConfigError(f"{where or 'experts'}: adapters on expert-parallel routed experts are not supported")


def from_peft(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's ``ParamWrapper`` factors (``lora_A.weight (E*r, d_in)``, ``lora_B.weight (d_out, r*E)``)
    as ours (``(d_in, E*r)``, ``(E*r, d_out)``)."""
    d_out, cols = lora_B.shape
    rank = cols // num_experts
    return lora_A.t().contiguous(), lora_B.view(d_out, rank, num_experts).permute(2, 1, 0).reshape(cols, d_out)


def to_peft(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`from_peft`."""
    cols, d_out = lora_B.shape
    rank = cols // num_experts
    return lora_A.t().contiguous(), lora_B.view(num_experts, rank, d_out).permute(2, 1, 0).reshape(d_out, cols)
