"""Auxiliary routing losses: pure functions of router tensors, tested against hand-computed values.

Shapes: ``probs`` (..., B, S, E) router probabilities over real experts, ``mask`` (B, S) 1 for
real (non-pad) tokens, ``sample_type`` (B,) the expert-group index that each sample's task type
belongs to, ``expert_type`` (..., E) the group of each expert. Leading dimensions (``...``) stack
several routers of the same shape, so the recorder computes a layer-stack's losses in one go; each
function then returns one value per router.
"""

from __future__ import annotations

import torch


def importance_per_sample(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Q[n, m]: sum over the real tokens of sample m of p[m, t, n]; shape (..., E, B)."""
    return torch.einsum("...bse,bs->...eb", probs, mask.to(probs.dtype))


def lbc_loss(
    probs: torch.Tensor, mask: torch.Tensor, sample_type: torch.Tensor, expert_type: torch.Tensor, delta: float
) -> torch.Tensor:
    """LoRAMoE's localized balancing constraint: Var(Z) / Mean(Z)^2 with Z = I * Q (CV^2).

    ``I[n, m] = 1 + delta`` where expert n's group equals sample m's group, else ``1 - delta``.
    Unbiased variance over all (E x B) entries, as the released code does.
    """
    q = importance_per_sample(probs, mask)
    same = expert_type.unsqueeze(-1) == sample_type
    z = (q * torch.where(same, 1.0 + delta, 1.0 - delta).to(q.dtype)).flatten(-2)
    return z.var(-1) / z.mean(-1).pow(2)


def load_balance_loss(probs: torch.Tensor, selected: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Switch / MoLA load balance ``E * sum_i f_i P_i``.

    ``probs`` (B, S, E') over all router outputs, ``selected`` (B, S, E') 0/1 top-k choices.
    ``f_i = count_i / (T * k)`` sums to 1 (HF Mixtral's form sums to k, a factor k apart);
    ``P_i`` is the mean router probability over real tokens.
    """
    m = mask.to(probs.dtype).unsqueeze(-1)
    tokens = m.sum().clamp_min(1.0)
    f = (selected.to(probs.dtype) * m).sum((-3, -2)) / (tokens * k)
    p = (probs * m).sum((-3, -2)) / tokens
    return probs.shape[-1] * (f * p).sum(-1)


def null_load_balance_loss(
    probs: torch.Tensor, selected: torch.Tensor, mask: torch.Tensor, k: int, num_null: int
) -> torch.Tensor:
    """AdaMoE's load balance: as :func:`load_balance_loss`, with the null experts' load (f and P)
    replaced by their mean, so the loss does not push tokens away from null experts one by one."""
    m = mask.to(probs.dtype).unsqueeze(-1)
    tokens = m.sum().clamp_min(1.0)
    f = (selected.to(probs.dtype) * m).sum((-3, -2)) / (tokens * k)
    p = (probs * m).sum((-3, -2)) / tokens
    if num_null > 0:
        n_real = probs.shape[-1] - num_null

        def average_nulls(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[..., :n_real], x[..., n_real:].mean(-1, keepdim=True).expand(*x.shape[:-1], num_null)], -1)

        f, p = average_nulls(f), average_nulls(p)
    return probs.shape[-1] * (f * p).sum(-1)


def z_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over real tokens of logsumexp(logits)^2."""
    m = mask.to(logits.dtype)
    return (torch.logsumexp(logits, -1).pow(2) * m).sum((-2, -1)) / m.sum().clamp_min(1.0)


def coefficient_of_variation(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std / mean over the last dimension (LoRAMoE's CV of expert importance)."""
    return x.std(-1) / x.mean(-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-token routing entropy -sum p ln p (0 ln 0 = 0)."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
