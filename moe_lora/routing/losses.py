"""Auxiliary routing losses: pure functions of router tensors, tested against hand-computed values.

Shapes: ``probs`` (..., B, S, E) router probabilities over real experts, ``mask`` (B, S) 1 for
real (non-pad) tokens, ``sample_type`` (B,) the expert-group index that each sample's task type
belongs to, ``expert_type`` (..., E) the group of each expert. Leading dimensions (``...``) stack
several routers of the same shape, so the recorder computes a layer-stack's losses in one go; each
function then returns one value per router.

``reduce`` (``adapter.aux_scope=global``) is a differentiable sum over data-parallel ranks: each
loss is then computed from sums over the global batch (Megatron's global-batch balancing) and
equals the one-process loss of that batch; ``None`` keeps each rank's loss on its own tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AuxLossConfig:
    """Which auxiliary losses a router contributes, with their weights."""

    lbc_beta: float = 0.0
    lbc_delta: float = 0.0
    lb_weight: float = 0.0
    z_loss_weight: float = 0.0
    lbc_mask_padding: bool = True  # the LBC over real tokens; LoRAMoE's released code counts padding (False)
    aux_mask_padding: bool = True  # the same for load balance and z-loss
    aux_scope: str = "local"  # local: each rank's own tokens; global: statistics summed over ranks
    # load balance per router (switch: Switch / MoLA, f sums to 1) or pooled over an MoE base's
    # layers (family: transformers' load_balancing_loss_func, f sums to k; routing/base_router.py)
    lb_form: str = "switch"


Reduce = Callable[[torch.Tensor], torch.Tensor]


def _sums(parts: list[torch.Tensor], reduce: Reduce | None) -> list[torch.Tensor]:
    """``parts`` summed over ranks in one collective (as they are without ``reduce``)."""
    if reduce is None:
        return parts
    flat = reduce(torch.cat([p.reshape(-1) for p in parts]))
    return [t.view(p.shape) for t, p in zip(flat.split([p.numel() for p in parts]), parts, strict=True)]


def importance_per_sample(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Q[n, m]: sum over the real tokens of sample m of p[m, t, n]; shape (..., E, B)."""
    return torch.einsum("...bse,bs->...eb", probs, mask.to(probs.dtype))


def lbc_loss(
    probs: torch.Tensor,
    mask: torch.Tensor,
    sample_type: torch.Tensor,
    expert_type: torch.Tensor,
    delta: float,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """LoRAMoE's localized balancing constraint: Var(Z) / Mean(Z)^2 with Z = I * Q (CV^2).

    ``I[n, m] = 1 + delta`` where expert n's group equals sample m's group, else ``1 - delta``.
    Unbiased variance over all (E x B) entries, as the released code does. Across ranks the
    entries of every rank's samples count: variance from the sums of z and z^2 (in float64, so
    the difference of two large sums keeps its digits).
    """
    q = importance_per_sample(probs, mask)
    same = expert_type.unsqueeze(-1) == sample_type
    z = (q * torch.where(same, 1.0 + delta, 1.0 - delta).to(q.dtype)).flatten(-2)
    if reduce is None:
        return z.var(-1) / z.mean(-1).pow(2)
    z64 = z.double()
    n = z.new_full(z.shape[:-1], z.shape[-1], dtype=torch.float64)
    s1, s2, n = _sums([z64.sum(-1), z64.pow(2).sum(-1), n], reduce)
    mean = s1 / n
    return ((s2 - s1 * mean) / (n - 1) / mean.pow(2)).to(z.dtype)


def _fractions(
    probs: torch.Tensor, selected: torch.Tensor, mask: torch.Tensor, k: int, reduce: Reduce | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, P): each output's share of the top-k slots and its mean probability, over real tokens."""
    m = mask.to(probs.dtype).unsqueeze(-1)
    counts, mass, tokens = _sums(
        [(selected.to(probs.dtype) * m).sum((-3, -2)), (probs * m).sum((-3, -2)), m.sum()], reduce
    )
    tokens = tokens.clamp_min(1.0)
    return counts / (tokens * k), mass / tokens


def load_balance_loss(
    probs: torch.Tensor, selected: torch.Tensor, mask: torch.Tensor, k: int, reduce: Reduce | None = None
) -> torch.Tensor:
    """Switch / MoLA load balance ``E * sum_i f_i P_i``.

    ``probs`` (B, S, E') over all router outputs, ``selected`` (B, S, E') 0/1 top-k choices.
    ``f_i = count_i / (T * k)`` sums to 1 (HF Mixtral's form sums to k, a factor k apart);
    ``P_i`` is the mean router probability over real tokens.
    """
    f, p = _fractions(probs, selected, mask, k, reduce)
    return probs.shape[-1] * (f * p).sum(-1)


def null_load_balance_loss(
    probs: torch.Tensor, selected: torch.Tensor, mask: torch.Tensor, k: int, num_null: int, reduce: Reduce | None = None
) -> torch.Tensor:
    """AdaMoE's load balance: as :func:`load_balance_loss`, with the null experts' load (f and P)
    replaced by their mean, so the loss does not push tokens away from null experts one by one."""
    f, p = _fractions(probs, selected, mask, k, reduce)
    if num_null > 0:
        n_real = probs.shape[-1] - num_null

        def average_nulls(x: torch.Tensor) -> torch.Tensor:
            return torch.cat(
                [x[..., :n_real], x[..., n_real:].mean(-1, keepdim=True).expand(*x.shape[:-1], num_null)], -1
            )

        f, p = average_nulls(f), average_nulls(p)
    return probs.shape[-1] * (f * p).sum(-1)


def family_load_balance_loss(
    probs: torch.Tensor,
    selected: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    num_null: int = 0,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """An MoE base's own load balance, transformers' ``load_balancing_loss_func``: the routers of
    all layers (``probs`` / ``selected`` ``(L, B, S, E')``) pooled, ``E' * sum_i f_i P_i`` with
    ``f_i`` = top-k picks of output i per real token (summing to k) and ``P_i`` its mean
    probability. With null experts, their f and P are replaced by their mean (AdaMoE's form, as
    :func:`null_load_balance_loss`). One value for the whole stack."""
    m = mask.to(probs.dtype).unsqueeze(-1)
    width = probs.shape[-1]
    counts, mass, tokens = _sums(
        [
            (selected.to(probs.dtype) * m).sum((-3, -2)).reshape(-1, width).sum(0),
            (probs * m).sum((-3, -2)).reshape(-1, width).sum(0),
            m.sum() * probs[..., 0, 0, 0].numel(),
        ],
        reduce,
    )
    tokens = tokens.clamp_min(1.0)
    f, p = counts / tokens, mass / tokens
    if num_null > 0:
        n_real = width - num_null
        f, p = (torch.cat([x[:n_real], x[n_real:].mean(-1, keepdim=True).expand(num_null)]) for x in (f, p))
    return width * (f * p).sum()


def z_loss(logits: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None = None) -> torch.Tensor:
    """Router z-loss: mean over real tokens of logsumexp(logits)^2."""
    m = mask.to(logits.dtype)
    total, tokens = _sums([(torch.logsumexp(logits, -1).pow(2) * m).sum((-2, -1)), m.sum()], reduce)
    return total / tokens.clamp_min(1.0)


def coefficient_of_variation(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std / mean over the last dimension (LoRAMoE's CV of expert importance)."""
    return x.std(-1) / x.mean(-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-token routing entropy -sum p ln p (0 ln 0 = 0)."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
