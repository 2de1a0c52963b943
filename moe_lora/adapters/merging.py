"""Folding an unrouted adapter into its base weights (peft's ``merge_and_unload``): the updates of
LoRA, MELoRA, ALoRA and IA3 read off the wrapper modules, and the refusal for routed variants. Used by
``moe_lora.merge`` and by ``moe-lora export --format merged|peft``."""

from __future__ import annotations

import torch
from torch import nn

from moe_lora.adapters.experts import AdaptedExperts, merge_experts
from moe_lora.adapters.layer import LoRAExperts, WrapsLinear
from moe_lora.adapters.slices import SlicedOutput
from moe_lora.adapters.variants.ia3 import IA3Linear, IA3Scale
from moe_lora.adapters.variants.melora import MELoRALinear
from moe_lora.errors import ConfigError
from moe_lora.routing.router import Router


# ---------------------------------------------------------------------------- the updates
def lora_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(A (d_in, r), B (r, d_out), scaling)`` with ``update = scaling * x A B`` for an unrouted
    LoRA-type layer (float32), else None."""
    if isinstance(module, MELoRALinear):  # blockdiag(B_i A_i) = blockdiag(A_i) blockdiag(B_i)
        return torch.block_diag(*module.lora_A.float()), torch.block_diag(*module.lora_B.float()), module.scaling
    if isinstance(module, LoRAExperts) and module.router is None and module.num_experts == 1:
        A, B = module.lora_A.float(), module.lora_B.float()
        gate, scaling = module.scale_hidden(torch.ones(A.shape[1], device=A.device), None)  # ALoRA: gate x active
        keep = gate.float().nonzero().flatten()
        if keep.numel() == 0:  # every component pruned: a zero update of rank 1
            return A[:, :1] * 0, B[:1] * 0, scaling
        return A[:, keep] * gate.float()[keep], B[keep], scaling
    return None


def ia3_scales(module: nn.Module) -> list[tuple[str, torch.Tensor, list[int] | None]] | None:
    """IA3's scalings of one wrapped linear: ``(site, vector, output columns or None)`` with site
    ``input`` or ``output``; None for any other module."""
    if isinstance(module, IA3Linear):
        return [("input" if module.scale_input else "output", module.ia3_l.float(), None)]
    if isinstance(module, SlicedOutput) and all(isinstance(p, IA3Scale) for p in module.parts.values()):
        return [
            ("output", part.ia3_l.float(), getattr(module, f"cols_{role}").tolist())
            for role, part in module.parts.items()
        ]
    return None


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The wrapper modules that injection put in place of base linears (outermost only)."""
    found: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, WrapsLinear) and not any(name.startswith(f"{n}.") for n in found):
            found[name] = mod
    return found


def refuse_routed(model: nn.Module, variant: str, fmt: str) -> None:
    if any(isinstance(m, Router) for m in model.modules()):
        routed_error(variant, fmt)
    if fmt == "peft" and any(isinstance(m, AdaptedExperts) for m in model.modules()):
        raise ConfigError(
            f"adapter={variant} adapts fused routed-expert tensors, which moe-lora does not export in peft's "
            "format (LoRA's target_parameters) yet; use --format merged or moe_lora"
        )


def routed_error(variant: str, fmt: str) -> None:
    raise ConfigError(
        f"adapter={variant} cannot be exported as {fmt}: its update depends on the input (a router "
        "weighs the experts per token), so no fixed weight or peft adapter equals it; use --format moe_lora"
    )


# ---------------------------------------------------------------------------- merged
@torch.no_grad()
def merge(model: nn.Module, variant: str) -> list[str]:
    """Fold every adapter into its base linear and put the base back in the wrapper's place;
    returns the merged module names. Refuses routed variants and anything it cannot fold."""
    refuse_routed(model, variant, "merged")
    tied = (
        {id(p) for p in model.get_input_embeddings().parameters()} if hasattr(model, "get_input_embeddings") else set()
    )
    merged = merge_experts(model)  # per-expert LoRA / IA3 folded into the fused expert tensors
    for name, wrapper in adapted_modules(model).items():
        base = wrapper.base
        if id(base.weight) in tied:
            raise ConfigError(
                f"adapter={variant} adapts {name}, whose weight is tied to the input embeddings: merging "
                "would change both; use --format moe_lora"
            )
        factors, scales = lora_factors(wrapper), ia3_scales(wrapper)
        if factors is not None:
            A, B, s = factors
            _add(base, s * (A @ B).T)
        elif scales is not None:
            for site, vec, cols in scales:
                _scale(base, site, vec, cols)
        else:
            raise ConfigError(f"adapter={variant}: moe-lora does not know how to merge {type(wrapper).__name__}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
        merged.append(name)
    return merged


def transposed(base: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as (d_in, d_out)."""
    return not isinstance(base, nn.Linear)


def _add(base: nn.Module, delta: torch.Tensor) -> None:
    """``W += delta`` with ``delta`` (d_out, d_in), in float32 then back to the weight's dtype."""
    w = base.weight
    d = delta.T if transposed(base) else delta
    w.copy_((w.float() + d.to(w.device)).to(w.dtype))


def _scale(base: nn.Module, site: str, vec: torch.Tensor, cols: list[int] | None) -> None:
    """IA3 folded: the output site scales the weight's output rows (and the bias), the input site
    its input columns."""
    w = base.weight
    out_dim = 1 if transposed(base) else 0
    dim = out_dim if site == "output" else 1 - out_dim
    index = torch.arange(w.shape[dim], device=w.device) if cols is None else torch.tensor(cols, device=w.device)
    shape = [1, 1]
    shape[dim] = -1
    scaled = w.float().index_select(dim, index) * vec.to(w.device).view(shape)
    w.index_copy_(dim, index, scaled.to(w.dtype))
    bias = getattr(base, "bias", None)
    if site == "output" and bias is not None:
        bias.index_copy_(0, index, (bias.float().index_select(0, index) * vec.to(bias.device)).to(bias.dtype))
