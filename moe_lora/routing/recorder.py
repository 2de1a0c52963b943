"""The routing recorder: every router reports to it; it owns auxiliary losses and statistics.

The training loop opens :meth:`RoutingRecorder.batch` around each micro-batch forward with the
batch's attention mask and task-type ids (a context, so no modelling code is touched). Routers then
call :meth:`record`; the recorder adds the configured auxiliary losses for that micro-batch and
accumulates statistics on the device. Nothing is copied to the host until :meth:`flush`, called
at logging steps.

Definitions (per adapted linear and per task type, over the real tokens of a logging window):
importance = sum of router probabilities; load = tokens routed to each output (top-k choices, or
the arg-max expert under soft routing); CV = unbiased std / mean of importance over real experts;
entropy = mean over tokens of -sum p ln p; null_rate = share of top-k slots that went to null
experts; real_experts_per_token = mean number of real experts a token used (AdaMoE's saving);
group_share = share of a task type's probability mass given to each expert group.

Data parallel: the recorder is handed its reductions (it never imports ``torch.distributed``).
``reduce`` sums the window's statistics over ranks at :meth:`flush`, so every row describes the
global batch; ``grad_reduce`` (a differentiable sum) serves auxiliary losses of routers whose
``aux_scope`` is ``global``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from moe_lora.config import TASK_TYPES
from moe_lora.routing import losses
from moe_lora.routing.losses import AuxLossConfig
from moe_lora.routing.router import Router


def stack_kept(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` that keeps an expert-major layout: the routers' probabilities are transposed
    views of contiguous ``(.., E, S)`` tensors (:func:`moe_lora.routing.router.softmax_experts`),
    and stacking them as they are would copy across that layout (slow: 7 MB per layer stack at 64
    experts); stacked transposed, it is a straight copy and the result has the same layout."""
    t = tensors[0]
    if t.dim() >= 2 and t.stride(-1) != 1 and t.stride(-2) == 1:
        return torch.stack([x.transpose(-1, -2) for x in tensors]).transpose(-1, -2)
    return torch.stack(tensors)


class RoutingRecorder:
    """Collects router outputs for aux losses (per micro-batch) and statistics (per window)."""

    def __init__(
        self,
        task_types: tuple[str, ...] = TASK_TYPES,
        statistics: bool = True,
        reduce: losses.Reduce | None = None,
        grad_reduce: losses.Reduce | None = None,
    ) -> None:
        self.task_types = task_types
        self.statistics = statistics
        self.reduce, self.grad_reduce = reduce, grad_reduce
        self.active = False
        self._masks: dict[str, torch.Tensor] = {}  # stream -> (B, S) mask of real tokens
        self._task: torch.Tensor | None = None
        self._weights: dict[str, torch.Tensor] = {}  # stream -> (B, S, K) mask x one-hot task type
        self._aux: torch.Tensor | None = None
        self._pending: list[tuple] = []
        self._stats: dict[tuple[str, ...], dict] = {}
        self._routers: dict[str, Router] = {}

    def attach(self, router: Router, name: str, aux: AuxLossConfig, stream: str = "input") -> None:
        """``stream``: which tokens the router sees, ``input`` (a causal LM's, an encoder's, and
        cross-attention keys and values) or ``target`` (an encoder-decoder's decoder tokens)."""
        router.module_name, router.recorder, router.aux, router.stream = name, self, aux, stream
        self._routers[name] = router

    @property
    def routers(self) -> dict[str, Router]:
        return self._routers

    @contextmanager
    def batch(
        self, attention_mask: torch.Tensor, task_type: torch.Tensor, target_mask: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Record the routers' outputs for one micro-batch forward. ``target_mask``: an
        encoder-decoder's decoder tokens (routers of the ``target`` stream are masked with it)."""
        self._task = task_type
        self._masks = {"input": attention_mask, "target": attention_mask if target_mask is None else target_mask}
        onehot = torch.nn.functional.one_hot(task_type, len(self.task_types)).to(torch.float32).unsqueeze(1)
        self._weights = {k: m.to(torch.float32).unsqueeze(-1) * onehot for k, m in self._masks.items()}
        self.active = True
        try:
            yield
            self._process()
        finally:
            self.active = False
            self._pending = []
            self._task = None
            self._masks, self._weights = {}, {}

    # ------------------------------------------------------------------------------ recording
    def record(self, router: Router, logits: torch.Tensor, probs: torch.Tensor, selected: torch.Tensor | None) -> None:
        """Called by a router inside :meth:`batch`. Tensors are (B, S, E) or (B, S, H, E) for
        routers that route each head separately (MoV); heads then count as extra tokens. (B*S, ..., E)
        from a model that flattens tokens (OPT's FFN) is unflattened with the batch's mask. The work
        is deferred to the end of the micro-batch, where routers of one shape are stacked and their
        losses and statistics computed together: a few ops per layer stack instead of per router."""
        mask = self._masks.get(router.stream)
        if mask is not None and probs.shape[0] == mask.numel() and (probs.dim() == 2 or probs.shape[:2] != mask.shape):
            # (B*S, ..., E): OPT flattens the tokens before its FFN, MoE bases before their router
            logits, probs = logits.unflatten(0, mask.shape), probs.unflatten(0, mask.shape)
            selected = selected.unflatten(0, mask.shape) if selected is not None else None
        if probs.dim() > 3:
            logits, probs = logits.flatten(1, -2), probs.flatten(1, -2)
            selected = selected.flatten(1, -2) if selected is not None else None
        self._pending.append((router, logits, probs, selected))

    def _process(self) -> None:
        groups: dict[tuple, list] = {}
        for item in self._pending:
            router, _, probs, selected = item
            key = (
                router.stream,
                tuple(probs.shape),
                router.num_experts,
                router.top_k,
                router.num_null,
                selected is None,
                router.aux or AuxLossConfig(),
            )
            groups.setdefault(key, []).append(item)
        self._pending = []
        for (stream, _, e, top_k, num_null, _, aux), items in groups.items():
            routers = [it[0] for it in items]
            logits, probs = stack_kept([it[1] for it in items]), stack_kept([it[2] for it in items])
            selected = None if items[0][3] is None else stack_kept([it[3] for it in items])
            mask = self._masks[stream]
            per_token = probs.shape[2] // mask.shape[1]
            if probs.shape[1] != mask.shape[0] or per_token * mask.shape[1] != probs.shape[2]:
                raise ValueError(
                    f"router {routers[0].module_name} saw {tuple(probs.shape[1:3])} tokens, but its {stream} "
                    f"tokens are {tuple(mask.shape)}: the router is on the wrong stream"
                )
            mask = mask.repeat_interleave(per_token, 1) if per_token > 1 else mask
            loss = self._aux_loss(routers, aux, e, top_k, num_null, logits, probs, selected, mask)
            if loss is not None:
                self._aux = loss if self._aux is None else self._aux + loss
            if self.statistics:
                with torch.no_grad():
                    self._accumulate(routers, e, probs.detach(), selected, per_token, stream)

    def _aux_loss(
        self,
        routers: list[Router],
        aux: AuxLossConfig,
        e: int,
        top_k: int | None,
        num_null: int,
        logits: torch.Tensor,
        probs: torch.Tensor,
        selected: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> torch.Tensor | None:
        """Sum over the stacked routers of the auxiliary losses their config switches on. ``mask``
        marks real tokens; each loss counts padding too where its own ``*_mask_padding`` is off."""
        terms = []
        lbc_mask = mask if aux.lbc_mask_padding else torch.ones_like(mask)
        aux_mask = mask if aux.aux_mask_padding else torch.ones_like(mask)
        red = self.grad_reduce if aux.aux_scope == "global" else None
        if aux.lbc_beta > 0:
            types = torch.stack([r.expert_type for r in routers])
            lbc = losses.lbc_loss(probs[..., :e], lbc_mask, self._task, types, aux.lbc_delta, red)
            terms.append(aux.lbc_beta * lbc.sum())
        if aux.lb_weight > 0 and selected is not None and aux.lb_form == "family":  # an MoE base's own
            terms.append(
                aux.lb_weight * losses.family_load_balance_loss(probs, selected, aux_mask, top_k, num_null, red)
            )
        elif aux.lb_weight > 0 and selected is not None:
            lb = losses.null_load_balance_loss(probs, selected, aux_mask, top_k, num_null, red)
            terms.append(aux.lb_weight * lb.sum())
        if aux.z_loss_weight > 0:
            terms.append(aux.z_loss_weight * losses.z_loss(logits, aux_mask, red).sum())
        return torch.stack(terms).sum() if terms else None

    def _accumulate(
        self,
        routers: list[Router],
        e: int,
        probs: torch.Tensor,
        selected: torch.Tensor | None,
        per_token: int,
        stream: str = "input",
    ) -> None:
        """Add this micro-batch's sums: one einsum over [probs | load | entropy | experts used]."""
        w = self._weights[stream]
        w = w.repeat_interleave(per_token, 1) if per_token > 1 else w
        n = probs.shape[-1]
        if selected is None:  # soft routing: every expert is used; load counts the arg-max expert
            # (max, not argmax: argmax over the routers' expert-major layout is 10x slower on the CPU)
            selected = torch.zeros_like(probs).scatter_(-1, probs.max(-1, keepdim=True).indices, 1.0)
            used = probs.new_full((*probs.shape[:-1], 1), float(e))
        else:
            used = selected[..., :e].sum(-1, keepdim=True)
        # features along dim -2, tokens last: the routers' expert-major probabilities (see
        # stack_kept) are copied straight, and the token sums are one batched GEMM per (router,
        # sequence) with no transposed copy of the (2E+2)-wide features
        ent = losses.entropy(probs).unsqueeze(-1)
        feats = torch.cat([t.transpose(-1, -2) for t in (probs, selected, ent, used)], -2)  # (R, B, F, S)
        sums = torch.matmul(feats, w.to(feats.dtype)).sum(1).transpose(-1, -2)  # (R, K, F)
        key = tuple(r.module_name for r in routers)
        acc = self._stats.get(key)
        if acc is None:
            self._stats[key] = {"sums": sums, "tokens": w.sum((0, 1)), "width": n}
        else:
            acc["sums"] += sums
            acc["tokens"] += w.sum((0, 1))

    def pop_aux_loss(self) -> torch.Tensor | None:
        """The summed auxiliary loss of the micro-batch just recorded (then cleared)."""
        loss, self._aux = self._aux, None
        return loss

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> list[dict]:
        """The open statistics window (a checkpoint may fall inside it), summed over ranks: rank 0
        resumes with the sums, the others with zeros; the next flush sums them again."""
        rows = [
            {"modules": list(k), "sums": a["sums"].clone(), "tokens": a["tokens"].clone(), "width": a["width"]}
            for k, a in self._stats.items()
        ]
        self._sum_over_ranks([t for r in rows for t in (r["sums"], r["tokens"])])
        return [{**r, "sums": r["sums"].cpu(), "tokens": r["tokens"].cpu()} for r in rows]

    def _sum_over_ranks(self, tensors: list[torch.Tensor]) -> None:
        """Each tensor summed over data-parallel ranks, in place, in one collective."""
        if self.reduce is None or not tensors:
            return
        flat = self.reduce(torch.cat([t.reshape(-1) for t in tensors]))
        for t, total in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(total.view(t.shape))

    def load_state_dict(self, rows: list[dict], device: torch.device, keep: bool = True) -> None:
        """Restore :meth:`state_dict`; ``keep=False`` (ranks other than 0) restores zeros."""
        self._stats = {
            tuple(r["modules"]): {
                "sums": r["sums"].to(device) * float(keep),
                "tokens": r["tokens"].to(device) * float(keep),
                "width": r["width"],
            }
            for r in rows
        }

    # ------------------------------------------------------------------------------ statistics
    def flush(self, step: int) -> list[dict]:
        """Statistics of the window since the last flush, one row per (module, task type), plus
        a task type ``all``; the window is then reset. The only host sync of the recorder (and,
        data parallel, its one all-reduce: every rank calls it at the same steps)."""
        self._sum_over_ranks([t for a in self._stats.values() for t in (a["sums"], a["tokens"])])
        rows = []
        for names, acc in self._stats.items():
            stacked, tokens, n = acc["sums"].double().cpu(), acc["tokens"].double().cpu(), acc["width"]
            for name, sums in zip(names, stacked, strict=True):
                rows += self._rows(step, name, sums, tokens, n)
        self._stats = {}
        return rows

    def _rows(self, step: int, name: str, sums: torch.Tensor, tokens: torch.Tensor, n: int) -> list[dict]:
        router = self._routers[name]
        e = router.num_experts
        cpu = {
            "importance": sums[:, :n],
            "load": sums[:, n : 2 * n],
            "entropy": sums[:, 2 * n],
            "null_slots": sums[:, n + e : 2 * n].sum(-1),
            "real_used": sums[:, 2 * n + 1],
            "tokens": tokens,
        }
        groups = router.expert_type.cpu()
        per_task = [(t, {k: v[i] for k, v in cpu.items()}) for i, t in enumerate(self.task_types)]
        per_task.append(("all", {k: v.sum(0) for k, v in cpu.items()}))
        return [
            {"step": step, "module": name, "task_type": task, **window_statistics(s, e, router.top_k or 1, groups)}
            for task, s in per_task
            if float(s["tokens"]) > 0
        ]


def window_statistics(s: dict[str, torch.Tensor], num_experts: int, k: int, groups: torch.Tensor) -> dict:
    """Derived statistics of one (module, task type) window from the accumulated sums."""
    tokens = float(s["tokens"])
    imp = s["importance"][:num_experts]
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    group_mass = torch.zeros(n_groups, dtype=imp.dtype).index_add_(0, groups, imp)
    return {
        "tokens": round(tokens),
        "importance": imp.tolist(),
        "load": s["load"][:num_experts].round().long().tolist(),
        "cv": float(losses.coefficient_of_variation(imp)) if num_experts > 1 else 0.0,
        "entropy": float(s["entropy"]) / tokens,
        "null_rate": float(s["null_slots"]) / (tokens * k),
        "real_experts_per_token": float(s["real_used"]) / tokens,
        "group_share": (group_mass / imp.sum().clamp_min(1e-30)).tolist(),
    }
