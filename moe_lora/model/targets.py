"""Targets: the sites ``adapter.target_modules`` selects in a model's structure, and the targets
table printed by ``moe-lora params`` and at the start of every run (``results.json["targets"]``).

Entries are roles, blocks (``attention``, ``ffn``, ``all``) or module names. Roles and blocks must
exist in every decoder layer; a module name must match in every layer it matches in any (or only
outside the layers, as ``lm_head``): a setting never selects silently less than it says.

Mixture-of-experts layers (:class:`moe_lora.model.structure.MoEBlock`). On a sparse layer the FFN is the
routed experts *and* the shared experts: ``ffn``, ``all`` and the FFN roles (``ffn_in``, ``ffn_gate``,
``ffn_up``, ``ffn_out``) mean both. ``experts`` is the routed experts, and their projections are
roles of their own (``expert_gate_up``, ``expert_gate``, ``expert_up``, ``expert_down``). Routed
experts stored as fused 3-D parameters (transformers 5) are sites too (:attr:`Site.expert`): one per
fused tensor, whole (``ffn_out`` selects ``experts.down_proj``; ``ffn_in``, ``ffn_gate`` and
``ffn_up`` the fused ``gate_up_proj``, as a LoRA-type variant adapts a fused linear whole), and so
is a module name that matches one (``down_proj`` is also ``experts.down_proj``). Injection refuses
them, in one line, for a variant that cannot adapt expert tensors. Routed experts held as a
``ModuleList`` of per-expert MLPs are Linears: every one of them is a site. ``shared_experts``
selects exactly the shared experts' linears of every sparse layer; ``router`` fails (no variant
adapts a base router yet); ``attention`` is the attention of every layer, dense or sparse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from moe_lora.errors import ConfigError
from moe_lora.model.structure import (
    BLOCKS,
    EXPERT_ROLES,
    FFN_ROLES,
    ROLES,
    ExpertTensor,
    Fused,
    LinearInfo,
    Structure,
    check_every_layer,
    is_adaptable,
    name_matches,
)


@dataclass(frozen=True)
class Site:
    """One linear an adapter goes on, and which of its roles the targets asked for."""

    name: str
    layer: int | None
    block: str | None
    roles: tuple[str, ...]  # everything the linear computes
    targeted: tuple[str, ...] | None  # roles the targets name on it; None: the whole linear by name or block
    fused: Fused | None
    entries: tuple[str, ...]  # the target_modules entries that chose it
    expert: ExpertTensor | None = None  # a fused routed-expert tensor (then ``name`` is the parameter's)

    @property
    def partial(self) -> bool:
        """Whether the targets ask for only some roles of a fused linear (IA3/MoV slice it)."""
        if self.targeted is None:
            return False
        own = set(self.fused.roles) if self.fused is not None else {r for r in self.roles if r != "ffn_in"}
        return len(own) > 1 and not own <= set(self.targeted) | {"ffn_in"}

    @property
    def input_site(self) -> bool:
        """peft's ``feedforward_modules``: IA3-type scaling applies to the input of ``ffn_out``."""
        return "ffn_out" in self.roles


def resolve_targets(structure: Structure, model: nn.Module, targets: list[str]) -> list[Site]:
    """The sites ``adapter.target_modules`` selects. Roles and blocks must exist in every layer;
    module names must match in every layer they match in any (or only outside the layers, as
    ``lm_head``): a setting never selects silently less than it says."""
    chosen: dict[str, dict] = {}
    for entry in targets:
        for li, roles in _entry_hits(structure, model, entry, targets):
            site = chosen.setdefault(li.name, {"li": li, "roles": set(), "whole": False, "entries": []})
            site["entries"].append(entry)
            if roles is None:
                site["whole"] = True
            else:
                site["roles"] |= set(roles)
    sites = []
    tensors = {t.name: t for b in structure.moe for t in b.tensors}
    for name, s in chosen.items():
        li = s["li"]
        targeted = None if s["whole"] or name in tensors else tuple(r for r in li.roles if r in s["roles"])
        site = Site(name, li.layer, li.block, li.roles, targeted, li.fused, tuple(s["entries"]), tensors.get(name))
        sites.append(site)
    order = {n: i for i, (n, _m) in enumerate(model.named_modules())}
    params = {n: i for i, (n, _p) in enumerate(model.named_parameters())}
    # an expert tensor sorts with its experts module, in the order of definition (gate_up, down)
    return sorted(
        sites, key=lambda s: (order[s.name.rpartition(".")[0]], params[s.name]) if s.expert else (order[s.name], -1)
    )


def expert_hits(structure: Structure, entry: str) -> list[LinearInfo]:
    """The fused routed-expert tensors ``entry`` covers, as LinearInfos (name, layer, role): all of
    them for ``experts``, ``ffn`` and ``all``; by projection for an expert role or an FFN role."""
    wanted = {
        "ffn_out": ("expert_down",),
        "ffn_in": ("expert_gate_up", "expert_gate", "expert_up", "expert"),
        "ffn_gate": ("expert_gate_up", "expert_gate"),
        "ffn_up": ("expert_gate_up", "expert_up"),
    }.get(entry, (entry,))
    every = entry in ("experts", "ffn", "all")
    return [
        LinearInfo(
            t.name, t.name.removeprefix(f"{b.path.rsplit('.', 1)[0]}."), b.layer, "ffn", (t.role,), part="experts"
        )
        for b in structure.moe
        for t in b.tensors
        if every or t.role in wanted
    ]


def _entry_hits(
    structure: Structure, model: nn.Module, entry: str, targets: list[str]
) -> list[tuple[LinearInfo, tuple[str, ...] | None]]:
    where = f"adapter.target_modules={targets}"
    if entry in ("experts", "shared_experts", "router", *EXPERT_ROLES):
        return _moe_hits(structure, entry, where)
    experts: list[LinearInfo] = []  # the fused routed experts an FFN entry covers on sparse layers
    if (structure.moe or structure.unread_experts) and entry in (*FFN_ROLES, "ffn", "all"):
        refuse_unread_experts(structure, entry, where)
        experts = expert_hits(structure, entry)
    if entry in ROLES:
        hits = [li for li in structure.linears if entry in li.roles]
        _require_every_layer(structure, hits + experts, entry, where, "role")
        return [(li, (entry,)) for li in hits] + [(li, None) for li in experts]
    if entry in BLOCKS or entry == "all":
        blocks = BLOCKS if entry == "all" else (entry,)
        hits = [li for li in structure.linears if li.block in blocks] + experts
        _require_every_layer(structure, hits, entry, where, "block")
        return [(li, None) for li in hits]
    known = {li.name: li for li in structure.linears}
    # a name matching a fused expert tensor (``down_proj`` is also ``experts.down_proj``) selects it
    hits = [li for li in expert_hits(structure, "experts") if name_matches(li.name, [entry])]
    for name, mod in model.named_modules():  # a linear outside the layers (lm_head) has no layer
        if is_adaptable(mod) and name_matches(name, [entry]):
            hits.append(known.get(name) or LinearInfo(name, name, None, None))
    if not hits:
        raise ConfigError(
            f"{where} matched no linear module for {entry!r} in {structure.family} (layer 0 has: "
            f"{structure.describe_layer(0)})"
        )
    in_layers = [li for li in hits if li.layer is not None]
    if in_layers:
        check_every_layer(structure, in_layers, "adapter.target_modules", entry)
    return [(li, None) for li in hits]


def refuse_unread_experts(structure: Structure, entry: str, where: str) -> None:
    """``entry`` covers the FFN of every layer; expert parameters outside any MoE block read cannot
    be adapted, so adapting the rest would be a silent subset: fail, naming them."""
    if structure.unread_experts:
        raise ConfigError(
            f"{where}: {entry!r} on {structure.family} would miss expert parameters moe_lora cannot read "
            f"({structure.unread_experts[0]}, {len(structure.unread_experts)} in all): target attention or "
            "linear module names"
        )


def refuse_expert_tensors(structure: Structure, sites: list[Site], variant: str, where: str) -> None:
    """For a variant that cannot adapt fused routed-expert tensors: fail in one line naming them,
    rather than adapting the rest of the FFN (shared experts, dense layers) alone."""
    tensors = [s.expert for s in sites if s.expert is not None]
    if not tensors:
        return
    block = next(b for b in structure.moe if any(t.name == tensors[0].name for t in b.tensors))
    shared = (
        ", or attention and the shared experts (adapter.target_modules=[attention, shared_experts])"
        if all(b.shared for b in structure.moe)
        else ""
    )
    dense = f"; layers {structure.dense_layers} are dense" if structure.dense_layers else ""
    names = ", ".join(t.describe() for t in tensors if t.name.startswith(f"{block.experts}."))
    raise ConfigError(
        f"{where} includes the routed experts of {len({t.name.rpartition('.')[0] for t in tensors})} sparse "
        f"layer(s) of {structure.family} (layer {block.layer}: {names}), fused {block.num_experts}-expert tensors "
        f"that adapter={variant} cannot adapt: use adapter=lora, or target attention only "
        f"(adapter.target_modules=[attention]){shared}{dense}"
    )


def _moe_hits(structure: Structure, entry: str, where: str) -> list[tuple[LinearInfo, tuple[str, ...] | None]]:
    """``experts``, ``shared_experts``, ``router`` and the expert projections: only on MoE layers."""
    if not structure.moe:
        raise ConfigError(
            f"{where}: {entry!r} targets mixture-of-experts layers, but {structure.family} has none (no module "
            f"with routed experts and a router; layer 0 has: {structure.describe_layer(0)})"
        )
    if entry == "router":
        block = structure.moe[0]
        raise ConfigError(
            f"{where}: no adapter variant adapts the base model's router yet ({block.router} "
            f"{list(block.router_shape)} in {structure.family}): target attention or shared_experts"
        )
    if entry == "shared_experts":
        hits = [li for li in structure.linears if li.part == "shared"]
        _require_sparse_layers(structure, hits, "shared experts", where)
        return [(li, None) for li in hits]
    refuse_unread_experts(structure, entry, where)
    hits = [li for li in structure.linears if li.part == "routed"]
    if entry != "experts":  # a per-expert MLP's projection by its FFN role
        role = {"expert_down": "ffn_out", "expert_gate": "ffn_gate", "expert_up": "ffn_up"}.get(entry, "ffn_in")
        hits = [li for li in hits if role in li.roles]
    hits += expert_hits(structure, entry)
    _require_sparse_layers(structure, hits, repr(entry), where)
    return [(li, None) for li in hits]


def _require_sparse_layers(structure: Structure, hits: list[LinearInfo], what: str, where: str) -> None:
    """Never a silent subset: an MoE target must be found in every sparse layer."""
    missing = sorted(set(structure.sparse_layers) - {li.layer for li in hits})
    if missing:
        raise ConfigError(
            f"{where}: {structure.family} has no {what} in sparse layer {missing[0]} "
            f"({structure.describe_layer(missing[0])})"
        )


def _require_every_layer(structure: Structure, hits: list[LinearInfo], entry: str, where: str, kind: str) -> None:
    layers = {li.layer for li in hits}
    missing = sorted(set(range(structure.num_layers)) - layers)
    if missing:
        how = structure.found.get(entry, "detected")
        layer = missing[0]
        raise ConfigError(
            f"{where}: {structure.family} has no {kind} {entry!r} in layer {layer} ({how}; its linears: "
            f"{structure.describe_layer(layer)}); target module names instead, or set "
            f"model.modules.{entry if entry != 'all' else 'ffn'}"
        )


# ---------------------------------------------------------------------------------- targets table
def targets_summary(structure: Structure, sites: list[Site], slices: bool) -> dict[str, Any]:
    """role/entry -> module names (inside a layer) and count per layer; stored in results.json."""
    rows: dict[str, dict[str, Any]] = {}
    locals_ = {li.name: li.local for li in [*structure.linears, *expert_hits(structure, "experts")]}
    for s in sites:
        local = locals_.get(s.name, s.name)
        fused_roles = "|".join(r for r in s.roles if r != "ffn_in")
        if s.expert is not None:  # IA3 scales down_proj's input, the others' output
            what = f"each of {s.expert.shape[0]} experts"
            what = f"{'input' if s.expert.role == 'expert_down' else 'output'} of {what}" if slices else what
        elif s.partial and slices:
            what = f"{'+'.join(s.targeted or ())} columns of fused {fused_roles}"
        elif slices:
            what = "input" if s.input_site else "output"
        else:
            what = f"whole fused {fused_roles}" if len(fused_roles.split("|")) > 1 else "linear"
        for entry in s.entries:
            row = rows.setdefault(entry, {"modules": {}, "layers": set()})
            m = row["modules"].setdefault(local, {"site": what, "layers": 0})
            m["layers"] += 1
            row["layers"].add(s.layer)
    out = {}
    for entry, row in rows.items():
        layers = sorted(x for x in row["layers"] if x is not None)
        per_layer = sum(1 for s in sites if entry in s.entries and s.layer == layers[0]) if layers else 0
        out[entry] = {
            "modules": sorted(row["modules"]),
            "per_layer": per_layer,
            "layers": len(layers),
            "sites": {k: v["site"] for k, v in row["modules"].items()},
            "found": structure.found.get(entry, "by name"),
        }
    summary = {
        "family": structure.family,
        "num_layers": structure.num_layers,
        "stacks": [list(s) for s in structure.stacks],
        "entries": out,
    }
    if structure.moe:
        summary["moe"] = moe_summary(structure)
    return summary


def moe_summary(structure: Structure) -> dict[str, Any]:
    """The MoE layers as the structure reader sees them (one description per distinct block shape)."""
    block = structure.moe[0]
    return {
        "sparse_layers": structure.sparse_layers,
        "dense_layers": structure.dense_layers,
        "num_experts": block.num_experts,
        "top_k": block.top_k,
        "aux_loss_coef": block.aux_loss_coef,
        "fused": block.fused,
        "block": block.describe(),
    }


def format_targets(summary: dict[str, Any]) -> str:
    """The targets table printed by ``moe-lora params`` and at the start of every run."""
    lines = [
        f"targets on {summary['family']} ({summary['num_layers']} layers in "
        f"{', '.join(p for p, _ in summary['stacks'])}):",
        f"  {'target':<12} {'found':<14} {'per layer':>9} {'layers':>6}  modules (site)",
    ]
    for entry, row in summary["entries"].items():
        mods = ", ".join(f"{m} ({row['sites'][m]})" for m in row["modules"])
        lines.append(f"  {entry:<12} {row['found']:<14} {row['per_layer']:>9} {row['layers']:>6}  {mods}")
    moe = summary.get("moe")
    if moe:
        dense = f"; dense layers {moe['dense_layers']}" if moe["dense_layers"] else ""
        how = "fused tensors" if moe["fused"] else "ModuleList of per-expert MLPs"
        lines.append(
            f"  MoE: sparse layers {moe['sparse_layers']}{dense}; {moe['num_experts']} routed experts "
            f"({how}), top-{moe['top_k']}"
        )
        lines.append(f"    e.g. {moe['block']}")
    return "\n".join(lines)
