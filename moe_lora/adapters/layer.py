"""The expert layer: a frozen base linear plus a low-rank update of E experts, computed at once.

Experts are stored concatenated, ``lora_A`` (d_in, E*r) and ``lora_B`` (E*r, d_out), next to the
router weight: three trainable tensors per adapted linear. The gate (with the alpha/r scaling
folded in) scales the small ``T x E*r`` hidden, never a ``T x d`` tensor, and the update is added
into the base output with one in-place ``addmm_``. There is no Python loop over experts and no host
sync. Top-k is a dense masked gate (unselected experts get weight 0): its BLAS GEMMs over all E*r
columns win while E*r is small; ``grouped=True`` (``adapter.expert_compute=grouped``) computes only
the chosen pairs, with CSR kernels on the CPU (:mod:`moe_lora.adapters.csr`) and grouped GEMMs on a
GPU, so its cost follows top-k rather than E. This layout is also the saved format. Plain LoRA is the
case E=1 without a router.

Parametrisations plug in here rather than forking the layer: ``shared_A`` (HydraLoRA: one A,
N heads B_i; ``A x`` is computed once and the gate expands it to ``T x N*r``) and
:meth:`LoRAExperts.scale_hidden` (ALoRA's diagonal gate overrides it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from moe_lora.adapters.csr import csr_update_
from moe_lora.errors import ConfigError
from moe_lora.model.structure import dims, is_adaptable
from moe_lora.routing.router import Router


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored transposed)."""
    if not is_adaptable(base):
        raise TypeError(f"cannot adapt a {type(base).__name__}; only nn.Linear and Conv1D")
    return dims(base)


class WrapsLinear(nn.Module):
    """An adapter module around a base linear (``self.base``). Its ``weight`` and ``bias`` are the
    base's, so model code that reads the wrapped linear's parameters still finds them (T5's FFN
    casts to ``wo.weight.dtype``; peft's layers expose theirs the same way)."""

    base: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)


def kaiming_uniform_(t: torch.Tensor, fan_in: int) -> None:
    """peft's kaiming-uniform(a=sqrt 5) on an (r, fan_in) matrix is U(-1/sqrt fan_in, 1/sqrt fan_in)."""
    if t.device.type != "meta":
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            t.uniform_(-bound, bound)


def make_router(base: nn.Module, cfg, num_experts: int, top_k: int | None, dtype: torch.dtype | None = None) -> Router:
    """A router on the adapted layer's input, configured by a :class:`MoEConfig`-like config."""
    d_in, _ = linear_dims(base)
    return Router(
        d_in,
        num_experts,
        top_k=top_k,
        num_null=getattr(cfg, "num_null_experts", 0),
        jitter=cfg.router_jitter,
        fp32=cfg.router_fp32,
        init=getattr(cfg, "router_init", "kaiming"),
        device=base.weight.device,
        dtype=dtype,
    )


def base_and_update(base: nn.Module, x: torch.Tensor, update: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """``base(x)`` with ``update`` adding the adapter's term into it in place.

    The base layer runs on the flattened ``(T, d_in)`` input, so its output is a fresh 2-D tensor
    that its own backward does not need. Adding in place saves the ``T x d_out`` copy an
    out-of-place ``addmm`` (or ``out + delta``) makes, the largest non-GEMM cost of the layer;
    adding into a 3-D view instead would make autograd clone the gradient (``CopySlices``)."""
    out = base(x.reshape(-1, x.shape[-1]))
    if out._base is not None and out._base.shape == out.shape:  # GPT-2's Conv1D returns a same-shape view
        out = out._base
    update(out)
    return out.view(*x.shape[:-1], out.shape[-1])


def grouped_update_(
    out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    expert: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    num_experts: int,
    scaling: float,
    drop_null: bool | None = None,
) -> None:
    """``out += scaling * sum_j weight_j B_e(j) A_e(j) x`` over each token's k choices only.

    The (token, expert) pairs are sorted by expert and each expert's rows go through one grouped
    GEMM (``torch._grouped_mm`` with device-side offsets: no host sync), then are added back with
    ``index_add_``. ``out`` (T, d_out), ``x`` (T, d_in), ``weight`` and ``expert`` (T, k) from
    :meth:`Router.choose`, whose picks of null experts (AdaMoE) have index ``num_experts`` and
    weight 0. On the CPU those pairs are dropped (a host sync costs nothing there), so the work
    follows the real experts chosen; on a GPU they ride with the last expert at weight 0, keeping
    shapes static and the step free of syncs. The gradients match the dense path's."""
    k, rank = expert.shape[-1], A.shape[1] // num_experts
    expert = expert.flatten()
    order = expert.argsort(stable=True)
    counts = torch.bincount(expert, minlength=num_experts + 1)  # the last bin: null picks
    offsets = counts[:num_experts].cumsum(0)
    if drop_null is None:
        drop_null = x.device.type == "cpu"
    if drop_null:
        order = order[: int(offsets[-1])]
    else:
        offsets = torch.cat([offsets[:-1], offsets.new_full((1,), expert.numel())])
    offsets = offsets.to(torch.int32)
    token = order // k
    A3 = A.view(A.shape[0], num_experts, rank).transpose(0, 1)  # (E, d_in, r)
    # index_select: faster than x[token] on the CPU, forward and backward
    h = torch._grouped_mm(x.index_select(0, token), A3, offs=offsets)  # (T*k, r)
    h = h * (weight.flatten().index_select(0, order) * scaling).unsqueeze(-1).to(h.dtype)
    y = torch._grouped_mm(h, B.view(num_experts, rank, B.shape[1]), offs=offsets)  # (T*k, d_out)
    out.index_add_(0, token, y.to(out.dtype))


# expert_compute=auto: grouped from this many experts per top-k choice. Measured with `moe-lora bench
# --experts 8,16,32,64 --variants mola,mola_grouped` (tiny shape, r=8, top-2, 2 CPU threads, CSR
# kernels): grouped/dense 1.25, 1.04, 0.82, 0.58; at 16 experts the two are even, from 32 grouped wins.
AUTO_GROUPED_PER_CHOICE = 16


class LoRAExperts(WrapsLinear):
    """``y = W0 x + s * sum_e g_e(x) B_e A_e dropout(x)`` with ``s = alpha / r``."""

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int,
        alpha: float,
        num_experts: int = 1,
        dropout: float = 0.0,
        router: Router | None = None,
        init_A: str = "kaiming",
        shared_A: bool = False,
        grouped: bool | str = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if router is None and num_experts != 1:
            raise ValueError("several experts need a router")
        self.base = base
        self.d_in, self.d_out = linear_dims(base)
        self.rank, self.num_experts, self.scaling = rank, num_experts, alpha / rank
        self.shared_A = shared_A
        routed_top_k = router is not None and router.top_k is not None and not shared_A
        # "auto" (adapter.expert_compute=auto): grouped where it is the faster path, decided per
        # forward for the compute dtype and device (see use_grouped); False/True: dense/grouped
        self.auto = grouped == "auto" and routed_top_k and num_experts >= AUTO_GROUPED_PER_CHOICE * router.top_k
        self.grouped = grouped is True and routed_top_k
        # the grouped path drops null experts' picks where a host sync is free (None: on the CPU)
        self.drop_null: bool | None = None
        # how grouped compute runs: "csr" (sparse kernels, the CPU's default) or "grouped_mm"
        # (torch's grouped GEMM, elsewhere); None: by the input's device
        self.kernel: str | None = None
        w = base.weight
        dtype = dtype or w.dtype  # adapter.dtype (float32) when injected; the base's dtype otherwise
        if self.grouped and not self.rows_fit(dtype):
            raise ConfigError(
                f"adapter.expert_compute=grouped needs rank ({rank}) and layer widths ({self.d_in}, "
                f"{self.d_out}) whose rows are multiples of 16 bytes in {dtype}; use dense"
            )
        a_cols = rank if shared_A else num_experts * rank
        self.lora_A = nn.Parameter(torch.empty(self.d_in, a_cols, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts * rank, self.d_out, dtype=dtype, device=w.device))
        self.router = router
        # (E, E*r) of 0/1: repeats expert e's gate over its r hidden columns (see scale_hidden)
        expand = torch.eye(num_experts, device=w.device).repeat_interleave(rank, dim=1)
        self.register_buffer("gate_expand", expand, persistent=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init_A == "normal":
            if w.device.type != "meta":
                nn.init.normal_(self.lora_A, 0.0, 0.02)
        else:
            kaiming_uniform_(self.lora_A, self.d_in)

    def hidden_and_gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``dropout(x) @ A`` and the router's gate. Without dropout, the router's logits come out
        of the same matmul, ``x @ [A | W_r^T]``: one read of x and one GEMM fewer, forward and
        backward."""
        router = self.router
        if router is not None and isinstance(self.lora_dropout, nn.Identity) and router.fusable(x):
            weight = torch.cat([self.lora_A, router.weight.t().to(self.lora_A.dtype)], 1)
            # split, not two slices: its backward is one cat instead of two zero-filled copies and an add
            h, logits = (self.matmul_input(x) @ weight).split([self.lora_A.shape[1], router.weight.shape[0]], -1)
            return h, router.gate(logits, self.lora_A.dtype)
        h = self.matmul_input(self.lora_dropout(x)) @ self.lora_A
        return h, (router(x) if router is not None else None)

    def matmul_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` for the ``@ A`` matmul: in the adapter's dtype, except under autocast, which casts
        by itself (an explicit upcast there would make autograd save one more copy of ``x``)."""
        return x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.dtype)

    def scale_hidden(self, h: torch.Tensor, gate: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """Apply the gate (times alpha/r) to the ``(..., E*r)`` hidden; returns it and the addmm
        factor still to apply."""
        if gate is None:
            return h, self.scaling
        if self.shared_A:  # HydraLoRA: one A x, expanded to the N heads by the gate
            gate = gate.to(h.dtype) * self.scaling
            return (h.unsqueeze(-2) * gate.unsqueeze(-1)).flatten(-2), 1.0
        # (gate * alpha/r) (.., E) @ expand (E, E*r) repeats each expert's gate over its r columns;
        # as a matmul its backward is a small GEMM rather than a strided sum over r
        return h * ((gate.to(h.dtype) * self.scaling) @ self.gate_expand.to(h.dtype)), 1.0

    def rows_fit(self, dtype: torch.dtype) -> bool:
        """Grouped GEMMs need rows of 16 bytes' multiples: the layer's widths and rank in ``dtype``."""
        return not any(n * dtype.itemsize % 16 for n in (self.d_in, self.d_out, self.rank))

    def kernel_for(self, x: torch.Tensor) -> str:
        """How the chosen pairs are computed: ``csr`` (:mod:`moe_lora.adapters.csr`) on the CPU,
        ``grouped_mm`` (torch's grouped GEMM) on a GPU and under ``torch.compile``; ``kernel``
        overrides it (tests run the GPU's kernel on the CPU)."""
        if self.kernel is not None:
            return self.kernel
        return "csr" if x.device.type == "cpu" and not torch.compiler.is_compiling() else "grouped_mm"

    def use_grouped(self, x: torch.Tensor, dt: torch.dtype) -> bool:
        """Whether this forward computes only the chosen pairs: always for ``grouped``; for
        ``auto`` where the kernel takes the compute dtype ``dt`` (the CSR kernels any; the grouped
        GEMM 16-byte rows, in bfloat16 on CUDA and when compiled)."""
        if self.grouped or not self.auto:
            return self.grouped
        if self.kernel_for(x) == "csr":
            return True
        if not self.rows_fit(dt):
            return False
        return dt == torch.bfloat16 or (x.device.type == "cpu" and not torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # grouped GEMMs are not autocast ops: they run in the autocast dtype by hand (CUDA's kernel
        # is bfloat16-only), in the adapter's dtype otherwise
        on = torch.is_autocast_enabled(x.device.type)
        dt = torch.get_autocast_dtype(x.device.type) if on else self.lora_A.dtype
        if self.use_grouped(x, dt):
            weight, expert = self.router.choose(x)
            weight, expert = weight.reshape(-1, weight.shape[-1]), expert.reshape(-1, expert.shape[-1])
            xd = self.lora_dropout(x).reshape(-1, self.d_in)
            E, s = self.num_experts, self.scaling
            if self.kernel_for(x) == "csr":  # float32 kernels: A, B as they are, x cast inside

                def update(out: torch.Tensor) -> None:
                    csr_update_(out, xd, weight, expert, self.lora_A, self.lora_B, E, s)
            else:

                def update(out: torch.Tensor) -> None:
                    A, B = self.lora_A.to(dt), self.lora_B.to(dt)
                    grouped_update_(out, xd.to(dt), weight, expert, A, B, E, s, self.drop_null)

            return base_and_update(self.base, x, update)
        h, gate = self.hidden_and_gate(x)
        h, alpha = self.scale_hidden(h, gate)
        h = h.reshape(-1, h.shape[-1])
        return base_and_update(
            self.base, x, lambda out: out.addmm_(h.to(out.dtype), self.lora_B.to(out.dtype), alpha=alpha)
        )

    def extra_repr(self) -> str:
        shared = ", shared_A" if self.shared_A else ""
        return f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, experts={self.num_experts}{shared}"


def routed_lora(base: nn.Module, cfg, plan, *, shared_A: bool = False) -> LoRAExperts:
    """The routed LoRA-expert layer most MoE variants build: experts, rank and top-k from the
    layer's plan (the layout), the rest from the variant's :class:`MoEConfig`."""
    return LoRAExperts(
        base,
        rank=plan.rank,
        alpha=cfg.alpha,
        num_experts=plan.num_experts,
        dropout=cfg.dropout,
        router=make_router(base, cfg, plan.num_experts, plan.top_k, plan.dtype),
        init_A=cfg.init_A,
        shared_A=shared_A,
        grouped={"grouped": True, "auto": "auto"}.get(getattr(cfg, "expert_compute", "dense"), False),
        dtype=plan.dtype,
    )
