"""Model structure: which linears play which role in which layer of which stack.

Injection asks this module; variants never guess module names. For any transformers model it finds
the decoder layers (the ``ModuleList`` of the classes in ``model._no_split_modules``, else the
longest list of identical blocks), the adaptable linears (``nn.Linear`` and GPT-2's ``Conv1D``) in
each, splits them into the attention block (everything under a submodule whose class or attribute
name says attention) and the FFN (the rest, under an MLP-like child or directly in the layer, as
OPT's ``fc1``/``fc2``), and classifies them:

- attention, by widths first: the projections reading the block input (``in = hidden``) are one
  fused q|k|v linear (``out = (H + 2K) d``), or query (``out = H d``) plus key and value (``out =
  K d``); the output projection reads ``H d`` and writes ``hidden``. Names (``q_proj``, ``query``,
  ``dense``, ``out_proj``...) break the ties widths leave (plain multi-head attention with
  ``H d = hidden``), then the order of definition does.
- FFN, by widths: ``ffn_out`` writes ``hidden`` from the intermediate width I, ``ffn_in`` reads
  ``hidden`` (the gate and up projections of a gated FFN both; a fused gate|up linear writes 2I);
  ``ffn_gate`` / ``ffn_up`` are named only where names or a known fused layout tell them apart.
  Router linears of MoE blocks (``out = num_experts`` or 1) are left out.

Mixture-of-experts blocks are read from the model, not from family names (:func:`find_moe`): a
module holding routed experts (an ``experts`` child with fused 3-D parameters, ``[E, out, in]`` as
Mixtral's ``gate_up_proj`` or ``[E, in, out]`` as gpt-oss's, or a ``ModuleList`` of per-expert
MLPs) and a router (a child whose weight has ``num_experts`` rows, a Linear or transformers 5's
``TopKRouter``), with optional shared experts (``shared_expert(s)``) and their gate. Layers without
one (DeepSeek's ``first_k_dense_replace``, Qwen-MoE's ``decoder_sparse_step`` / ``mlp_only_layers``)
are dense. Linears inside an MoE block are tagged with their ``part`` (routed, shared, shared_gate,
router), so targets can tell the shared experts from the routed ones and never adapt one of them
silently for the other.

The result is cross-checked against peft's per-family target tables (imported, not copied): every
module peft names must exist in every layer, and peft's IA3 feed-forward modules must be this
module's ``ffn_out``. ``model.modules`` overrides any key (a role or a block) with module-name
patterns of its own: the YAML keeps full control.

Fused projections. A linear that computes several roles (``c_attn``, ``query_key_value``,
``qkv_proj``, ``gate_up_proj``) has a column layout per family, written down in ``FUSED`` from the
line of transformers' modelling code that splits it. Variants defined on a role (IA3, MoV) act on
that role's columns only; LoRA-type variants act on the whole output (as peft does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from peft.utils import constants as peft_tables
from torch import nn

from moe_lora.config import module_overrides
from moe_lora.errors import ConfigError

ATTENTION_ROLES = ("query", "key", "value", "output")
FFN_ROLES = ("ffn_in", "ffn_gate", "ffn_up", "ffn_out")
ROLES = ATTENTION_ROLES + FFN_ROLES
BLOCKS = ("attention", "ffn")
# Targets of MoE layers: all routed experts, their fused projections, the shared experts, the router.
EXPERT_ROLES = ("expert_gate_up", "expert_gate", "expert_up", "expert_down")
MOE_TARGETS = ("experts", "shared_experts", "router", *EXPERT_ROLES)
# num_experts and top_k under each family's config name (Mixtral/gpt-oss, OLMoE/Qwen-MoE, DeepSeek; Hunyuan)
NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_top_k", "num_selected_experts")
AUX_COEF_KEYS = ("router_aux_loss_coef", "aux_loss_alpha")
_EXPERTS_CHILD = re.compile(r"experts|expert_mlps|moe_experts", re.IGNORECASE)
_SHARED_CHILD = re.compile(r"shared_experts?|shared_mlp", re.IGNORECASE)
_SHARED_GATE = re.compile(r"shared_experts?_gate", re.IGNORECASE)

_HINTS = {  # the last name segment, lower-cased
    "query": r"q|q_proj|query|wq|q_lin|query_proj|q_attn",
    "key": r"k|k_proj|key|wk|k_lin|key_proj",
    "value": r"v|v_proj|value|wv|v_lin|value_proj",
    "output": r"o|o_proj|out_proj|dense|c_proj|wo|out_lin|output|out|proj|linear_out",
    "qkv": r"qkv|qkv_proj|query_key_value|c_attn|wqkv|w_pack|in_proj",
    "ffn_gate": r"gate_proj|w1|wi_0|gate|fc_gate",
    "ffn_up": r"up_proj|w3|wi_1|up",
    "ffn_out": r"down_proj|fc2|dense_4h_to_h|c_proj|wo|w2|fc_out|out_proj|down",
}
_ATTN_MODULE = re.compile(r"attention|attn", re.IGNORECASE)
_FFN_MODULE = re.compile(r"mlp|ffn|feed_?forward|dense_?relu_?dense|layerff|mlp_block", re.IGNORECASE)


def _hint(local: str, kind: str) -> bool:
    return re.fullmatch(_HINTS[kind], local.rsplit(".", 1)[-1].lower()) is not None


# ------------------------------------------------------------------------------------------ fused
@dataclass(frozen=True)
class Fused:
    """The column layout of a fused linear's output: ``groups`` repeats of ``parts`` (role, width).

    Contiguous q|k|v is one group; GPT-NeoX's per-head interleaving is H groups of (q, k, v)."""

    groups: int
    parts: tuple[tuple[str, int], ...]
    rule: str  # the modelling code's split, for the targets table and docs/real-models.md

    @property
    def width(self) -> int:
        return self.groups * sum(w for _, w in self.parts)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r for r, _ in self.parts))

    def columns(self, role: str) -> list[int]:
        """Output columns of ``role``, group by group (so heads stay in the model's order)."""
        cols, step = [], sum(w for _, w in self.parts)
        for g in range(self.groups):
            offset = g * step
            for r, w in self.parts:
                if r == role:
                    cols += range(offset, offset + w)
                offset += w
        return cols


def _contiguous(h: int, k: int, d: int, rule: str) -> Fused:
    return Fused(1, (("query", h * d), ("key", k * d), ("value", k * d)), rule)


def _per_head(h: int, d: int, rule: str) -> Fused:
    return Fused(h, (("query", d), ("key", d), ("value", d)), rule)


def _falcon(config: Any, h: int, k: int, d: int) -> Fused:
    if getattr(config, "new_decoder_architecture", False):  # view(B, T, K, H/K + 2, d)
        return Fused(k, (("query", h // k * d), ("key", d), ("value", d)), "per kv group (q x H/K, k, v)")
    if getattr(config, "multi_query", False):  # view(B, T, H + 2, d): q heads, then one k, one v
        return _contiguous(h, 1, d, "q|k|v contiguous (multi-query)")
    return _per_head(h, d, "per head (q, k, v)")  # view(B, T, H, 3, d)


def _bigcode(config: Any, h: int, k: int, d: int) -> Fused:
    if getattr(config, "multi_query", True):  # split((D, kv_dim, kv_dim))
        return _contiguous(h, 1, d, "q|k|v contiguous (multi-query)")
    return _per_head(h, d, "per head (q, k, v)")  # view(B, T, H, 3d).split(d)


def _codegen(config: Any, h: int, k: int, d: int) -> Fused:  # view(B, T, 4, 3D/4).split(D/4): q, v, k
    local = h * d // 4
    return Fused(4, (("query", local), ("value", local), ("key", local)), "4 groups of (q, v, k)")


# model_type -> (config, H, K, d) -> column layout of the fused q|k|v linear
FUSED_QKV = {
    "gpt2": lambda c, h, k, d: _contiguous(h, h, d, "q|k|v contiguous"),  # c_attn(x).split(D, dim=2)
    "phi3": lambda c, h, k, d: _contiguous(h, k, d, "q|k|v contiguous"),  # qkv[..., :query_pos] ...
    "mpt": lambda c, h, k, d: _contiguous(h, k, d, "q|k|v contiguous"),  # Wqkv(x).chunk(3, dim=2)
    "gpt_neox": lambda c, h, k, d: _per_head(h, d, "per head (q, k, v)"),  # view(..., H, 3d).chunk(3)
    "bloom": lambda c, h, k, d: _per_head(h, d, "per head (q, k, v)"),  # view(B, T, H, 3, d)
    "persimmon": lambda c, h, k, d: _per_head(h, d, "per head (q, k, v)"),  # view(B, T, H, 3, d)
    "falcon": _falcon,
    "gpt_bigcode": _bigcode,
    "codegen": _codegen,
}
# model_type -> intermediate width -> column layout of the fused gate|up linear
FUSED_GATE_UP = {
    "phi3": lambda i: Fused(1, (("ffn_gate", i), ("ffn_up", i)), "gate|up contiguous")  # gate, up = chunk(2)
}


# Cross-attention submodules of encoder-decoders (T5; BART, mBART, Pegasus, Marian, Whisper; others):
# their keys and values are computed from the encoder's output.
CROSS_ATTENTION = frozenset({"EncDecAttention", "encoder_attn", "crossattention", "cross_attn", "cross_attention"})


# ------------------------------------------------------------------------------------- structure
@dataclass(frozen=True)
class LinearInfo:
    """One adaptable linear of a decoder layer and what it computes."""

    name: str  # path in the model
    local: str  # path inside its layer, e.g. self_attn.q_proj
    layer: int | None  # index over all stacks (None: outside the decoder layers)
    block: str | None  # attention | ffn | None (neither: e.g. a Mamba mixer)
    roles: tuple[str, ...] = ()
    fused: Fused | None = None  # the column layout, for a linear with several q/k/v or gate/up roles
    d_in: int = 0
    d_out: int = 0
    part: str | None = None  # inside an MoE block: routed | shared | shared_gate | router


@dataclass(frozen=True)
class ExpertTensor:
    """One fused 3-D parameter of the routed experts, e.g. ``mlp.experts.gate_up_proj [E, 2I, H]``."""

    name: str  # path in the model
    role: str  # one of EXPERT_ROLES
    shape: tuple[int, ...]
    order: str  # "[E, out, in]" (Mixtral, OLMoE, Qwen-MoE, DeepSeek) or "[E, in, out]" (gpt-oss)
    bias: str | None = None  # its per-expert bias (gpt-oss's ``gate_up_proj_bias``)

    def describe(self) -> str:
        return f"{self.name} {list(self.shape)}"


@dataclass(frozen=True)
class MoEBlock:
    """The MoE block of one sparse layer, read from the model."""

    layer: int
    path: str  # e.g. model.layers.1.mlp
    experts: str  # the routed experts' module
    num_experts: int
    top_k: int | None
    tensors: tuple[ExpertTensor, ...] = ()  # fused routed experts; empty for a ModuleList of MLPs
    router: str | None = None
    router_shape: tuple[int, ...] = ()
    router_bias: bool = False
    shared: str | None = None  # the shared experts' module
    shared_gate: str | None = None
    aux_loss_coef: float | None = None

    @property
    def fused(self) -> bool:
        return bool(self.tensors)

    def describe(self) -> str:
        """``routed 4 x [mlp.experts.gate_up_proj [4, 128, 32], ...] (top-2), shared mlp.shared_expert``"""
        where = len(self.path) + 1
        if self.fused:
            routed = ", ".join(
                f"{t.name[where:]} {list(t.shape)} {t.order}" + (" +bias" if t.bias else "") for t in self.tensors
            )
        else:
            routed = f"{self.experts[where:]} ModuleList of per-expert MLPs"
        out = f"{self.path}: routed experts {routed}"
        out += f", top-{self.top_k}" if self.top_k else ""
        if self.router:
            out += f", router {self.router[where:]} {list(self.router_shape)}" + (" +bias" if self.router_bias else "")
        if self.shared:
            out += f", shared experts {self.shared[where:]}"
        if self.shared_gate:
            out += f" (gate {self.shared_gate[where:]})"
        return out


@dataclass(frozen=True)
class Structure:
    family: str
    stacks: tuple[tuple[str, int], ...]  # (path of the layer list, number of layers)
    linears: tuple[LinearInfo, ...]
    head_dim: int
    found: dict[str, str] = field(default_factory=dict)  # role or block -> "detected" | "model.modules"
    moe: tuple[MoEBlock, ...] = ()  # one per sparse layer; the other layers are dense
    unread_experts: tuple[str, ...] = ()  # 3-D parameters with num_experts rows outside any MoE block read

    @property
    def num_layers(self) -> int:
        return sum(n for _, n in self.stacks)

    @property
    def sparse_layers(self) -> list[int]:
        return [b.layer for b in self.moe]

    @property
    def dense_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in set(self.sparse_layers)] if self.moe else []

    def in_layer(self, layer: int) -> list[LinearInfo]:
        return [li for li in self.linears if li.layer == layer]

    def describe_layer(self, layer: int = 0) -> str:
        """``self_attn.qkv_proj (query+key+value), mlp.down_proj (ffn_out), ...`` for error messages."""
        parts = []
        for li in self.in_layer(layer):
            roles = "+".join(r for r in li.roles if r != "ffn_in" or len(li.roles) == 1) or li.block or "unclassified"
            if li.part == "shared_gate":
                roles = "shared experts' gate"
            elif li.part in ("routed", "shared"):
                roles = f"{li.part} expert {roles}"
            parts.append(f"{li.local} ({roles})")
        block = next((b for b in self.moe if b.layer == layer), None)
        if block is not None and block.fused:
            parts += [
                f"{t.name.removeprefix(block.path.rsplit('.', 1)[0] + '.')} {list(t.shape)} (fused routed experts)"
                for t in block.tensors
            ]
        return ", ".join(parts)


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder-decoder (T5): its transformers config says so."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape  # Conv1D stores the weight transposed
    return d_in, d_out


def find_stacks(model: nn.Module) -> tuple[tuple[str, int], ...]:
    """The layer lists: of the classes transformers keeps whole (``_no_split_modules``), else the
    longest list of identical modules that hold linears. Lists inside a found list are skipped."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]

    def holds_linears(m: nn.Module) -> bool:
        return any(is_adaptable(x) for x in m.modules())

    chosen = [(n, m) for n, m in lists if all(type(x).__name__ in blocks for x in m)]
    if not chosen:
        same = [(n, m) for n, m in lists if len({type(x) for x in m}) == 1 and holds_linears(m[0])]
        chosen = sorted(same, key=lambda nm: -len(nm[1]))[:1]
    stacks: list[tuple[str, int]] = []
    for n, m in chosen:
        if not any(n.startswith(f"{s}.") for s, _ in stacks):
            stacks.append((n, len(m)))
    if not stacks:
        raise ConfigError(
            f"cannot find the decoder layers of {type(model).__name__} (no ModuleList of "
            f"{sorted(blocks) or 'identical blocks'}): name the modules in model.modules"
        )
    return tuple(stacks)


def attention_shape(config: Any, hidden: int) -> tuple[int, int]:
    """(query heads, head size) from a transformers config."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(heads), int(head_dim)


def read_structure(model: nn.Module, modules: Any = None) -> Structure:
    """The structure of ``model``; ``modules`` (``model.modules``: a ModulesConfig or a dict)
    overrides roles and blocks."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None) or type(model).__name__
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "d_model", 0))
    heads, head_dim = attention_shape(config, hidden)
    stacks = find_stacks(model)
    linears: list[LinearInfo] = []
    moe: list[MoEBlock] = []
    offset = 0
    for path, n in stacks:
        layers = model.get_submodule(path)
        for i in range(n):
            block = find_moe(layers[i], f"{path}.{i}", offset + i, config, hidden)
            moe += [block] if block is not None else []
            found = _classify_layer(
                layers[i], f"{path}.{i}", offset + i, family, config, hidden, heads, head_dim, block
            )
            linears += _tag_moe(found, block) if block is not None else found
        offset += n
    found = {k: "detected" for k in ROLES + BLOCKS + (MOE_TARGETS if moe else ())}
    unread = _unread_experts(model, stacks, config, moe)
    structure = Structure(family, stacks, tuple(linears), head_dim, found, tuple(moe), unread)
    overrides = module_overrides(modules) if modules is not None else {}
    if overrides:
        structure = _override(structure, overrides)
    return structure


def _unread_experts(model: nn.Module, stacks: Any, config: Any, moe: list[MoEBlock]) -> tuple[str, ...]:
    """A safety net for MoE layouts :func:`find_moe` does not know: 3-D parameters of the decoder
    layers with ``num_experts`` (from the config) rows that no MoE block read. Targets of the FFN
    refuse them rather than adapt the rest."""
    num = _first_attr(config, NUM_EXPERTS_KEYS)
    if not num:
        return ()
    known = {t.name for b in moe for t in b.tensors}
    return tuple(
        f"{path}.{name} {list(p.shape)}"
        for path, _n in stacks
        for name, p in model.get_submodule(path).named_parameters()
        if p.ndim == 3 and p.shape[0] == num and f"{path}.{name}" not in known
    )


def _first_attr(config: Any, keys: tuple[str, ...]) -> Any:
    return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), None)


def find_moe(layer: nn.Module, prefix: str, index: int, config: Any, hidden: int) -> MoEBlock | None:
    """The MoE block of a decoder layer, or None for a dense layer: a module with routed experts
    (an ``experts`` child holding fused 3-D parameters, or a ``ModuleList`` of per-expert MLPs),
    its router (a child whose weight has ``num_experts`` rows) and optional shared experts."""
    for local, mod in layer.named_modules():
        children = dict(mod.named_children())
        ename = next((n for n in children if _EXPERTS_CHILD.fullmatch(n)), None)
        if ename is None:
            continue
        experts = children[ename]
        fused = [(n, p) for n, p in experts.named_parameters(recurse=False) if p.ndim == 3]
        if fused:
            num = int(fused[0][1].shape[0])
        elif (
            isinstance(experts, nn.ModuleList) and len(experts) > 1 and any(is_adaptable(m) for m in experts.modules())
        ):
            num = len(experts)
        else:
            continue
        path = f"{prefix}.{local}" if local else prefix
        shared = next((n for n in children if _SHARED_CHILD.fullmatch(n)), None)
        shared_gate = next((n for n in children if _SHARED_GATE.fullmatch(n)), None)
        router, router_mod = _find_router(mod, (ename, shared, shared_gate), num)
        top_k = _first_attr(config, TOP_K_KEYS)
        return MoEBlock(
            layer=index,
            path=path,
            experts=f"{path}.{ename}",
            num_experts=num,
            top_k=int(top_k) if top_k is not None else None,
            tensors=_expert_tensors(f"{path}.{ename}", experts, fused, hidden),
            router=f"{path}.{router}" if router else None,
            router_shape=tuple(router_mod.weight.shape) if router_mod is not None else (),
            router_bias=_router_bias(mod, router_mod),
            shared=f"{path}.{shared}" if shared else None,
            shared_gate=f"{path}.{shared_gate}" if shared_gate else None,
            aux_loss_coef=_first_attr(config, AUX_COEF_KEYS),
        )
    return None


_ROUTER_CHILD = re.compile(r"gate|router|gating|wg|classifier|layer", re.IGNORECASE)
_ROUTER_BIASES = ("e_score_correction_bias", "expert_bias")  # DeepSeek-V3's, AFMoE's selection bias


def _find_router(block: nn.Module, skip: tuple[str | None, ...], num: int) -> tuple[str | None, nn.Module | None]:
    """The router under an MoE block (outside its experts): a module whose 2-D weight has
    ``num_experts`` rows (``gate``, gpt-oss's ``router``, or nested as AFMoE's ``router.gate`` and
    HunYuan's ``gate.wg``); else one named like a router (LongCat's ``router.classifier`` also
    scores its zero-computation experts)."""
    found = [
        (f"{child}.{n}" if n else child, m)
        for child, c in block.named_children()
        if child not in skip
        for n, m in c.named_modules()
        if isinstance(getattr(m, "weight", None), nn.Parameter | torch.Tensor) and m.weight.ndim == 2
    ]
    hit = next(((n, m) for n, m in found if m.weight.shape[0] == num), None)
    if hit is None:
        hit = next(((n, m) for n, m in found if all(_ROUTER_CHILD.fullmatch(p) for p in n.split("."))), None)
    return hit if hit is not None else (None, None)


def _router_bias(block: nn.Module, router: nn.Module | None) -> bool:
    """Whether routing adds a bias: the router's own, or a per-expert selection bias."""
    if router is not None and getattr(router, "bias", None) is not None:
        return True
    names = {n.rsplit(".", 1)[-1] for n, _ in [*block.named_parameters(), *block.named_buffers()]}
    return any(b in names for b in _ROUTER_BIASES)


def _expert_tensors(prefix: str, experts: nn.Module, fused: list, hidden: int) -> tuple[ExpertTensor, ...]:
    """Role and axis order of each fused expert parameter: ``[E, out, in]`` where the last axis
    reads ``hidden`` (an input projection) or the middle one writes it (``down``), else ``[E, in, out]``;
    a square tensor takes the order of its siblings."""
    params = dict(experts.named_parameters(recurse=False))
    found = []
    for name, p in fused:
        _e, a, b = p.shape
        low = name.lower()
        if "gate_up" in low:
            role = "expert_gate_up"
        elif "down" in low or low == "w2":
            role = "expert_down"
        elif "gate" in low or low == "w1":
            role = "expert_gate"
        elif "up" in low or low == "w3":
            role = "expert_up"
        else:  # no name says which projection: targetable as `experts` only
            role = "expert"
        if a == b:
            order = None
        elif role == "expert_down":
            order = "[E, out, in]" if a == hidden else "[E, in, out]"
        else:
            order = "[E, out, in]" if b == hidden else "[E, in, out]"
        bias = f"{name}_bias" if params.get(f"{name}_bias") is not None else None
        found.append([f"{prefix}.{name}", role, tuple(p.shape), order, f"{prefix}.{bias}" if bias else None])
    known = next((f[3] for f in found if f[3] is not None), "[E, out, in]")
    return tuple(ExpertTensor(n, r, sh, o or known, bi) for n, r, sh, o, bi in found)


def _tag_moe(linears: list[LinearInfo], block: MoEBlock) -> list[LinearInfo]:
    """Linears of an MoE block with their part: a router or the shared experts' gate is neither
    block; per-expert MLP linears (a ModuleList) and shared experts stay in the FFN."""
    out = []
    for li in linears:
        if block.router and li.name == block.router:
            li = replace(li, block=None, roles=("router",), fused=None, part="router")
        elif block.shared_gate and li.name == block.shared_gate:
            li = replace(li, block=None, roles=(), fused=None, part="shared_gate")
        elif block.shared and li.name.startswith(f"{block.shared}."):
            li = replace(li, block="ffn", part="shared")
        elif li.name.startswith(f"{block.experts}."):
            li = replace(li, block="ffn", part="routed")
        out.append(li)
    return out


def _classify_layer(
    layer: nn.Module,
    prefix: str,
    index: int,
    family: str,
    config: Any,
    hidden: int,
    heads: int,
    head_dim: int,
    moe: MoEBlock | None = None,
) -> list[LinearInfo]:
    attn_roots = _attention_roots(layer)
    in_moe = moe.path.removeprefix(prefix).lstrip(".") if moe is not None else None
    groups: dict[str, list[tuple[str, int, int]]] = {}  # attention root or "ffn" -> (local, d_in, d_out)
    other: list[tuple[str, int, int]] = []
    for local, mod in layer.named_modules():
        if not local or not is_adaptable(mod):
            continue
        d_in, d_out = dims(mod)
        root = next((r for r in attn_roots if local.startswith(f"{r}.")), None)
        if root is not None:
            groups.setdefault(root, []).append((local, d_in, d_out))
        elif (
            "." not in local
            or any(_FFN_MODULE.search(part) for part in local.split(".")[:-1])
            or (in_moe is not None and (not in_moe or local.startswith(f"{in_moe}.")))
        ):
            groups.setdefault("ffn", []).append((local, d_in, d_out))
        else:
            other.append((local, d_in, d_out))
    out: list[LinearInfo] = []
    for key, lins in groups.items():
        if key == "ffn":
            roles = _ffn_roles(lins, hidden, family, config)
        else:
            roles = _attention_roles(lins, hidden, heads, head_dim, family, config)
        block = "ffn" if key == "ffn" else "attention"
        for local, d_in, d_out in lins:
            r, fused = roles.get(local, ((), None))
            if r is None:  # a router: neither block
                out.append(LinearInfo(f"{prefix}.{local}", local, index, None, ("router",), None, d_in, d_out))
                continue
            out.append(LinearInfo(f"{prefix}.{local}", local, index, block, r, fused, d_in, d_out))
    out += [LinearInfo(f"{prefix}.{lo}", lo, index, None, (), None, a, b) for lo, a, b in other]
    return sorted(out, key=lambda li: next(i for i, (n, _m) in enumerate(layer.named_modules()) if n == li.local))


def _attention_roots(layer: nn.Module) -> list[str]:
    """Outermost submodules that are attention (class or attribute name), e.g. ``self_attn``."""
    roots: list[str] = []
    for name, mod in layer.named_modules():
        if not name or any(name.startswith(f"{r}.") for r in roots):
            continue
        named = _ATTN_MODULE.search(type(mod).__name__) or _ATTN_MODULE.search(name.rsplit(".", 1)[-1])
        if named and not is_adaptable(mod) and any(is_adaptable(m) for m in mod.modules()):
            roots.append(name)
    return roots


Roles = dict[str, tuple[tuple[str, ...] | None, Fused | None]]


def _attention_roles(
    lins: list[tuple[str, int, int]], hidden: int, heads: int, head_dim: int, family: str, config: Any
) -> Roles:
    q_width = heads * head_dim
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    routers = {lo for lo, a, b in lins if a == hidden and b < hidden and (b == 1 or b == experts)}
    roles: Roles = {lo: (None, None) for lo in routers}  # mixture-of-attention routers: no role
    lins = [x for x in lins if x[0] not in routers]
    outs = [lo for lo, a, b in lins if b == hidden and a in (q_width, hidden) and _hint(lo, "output")]
    if not outs:  # no name says it: the one writing `hidden` from H*d that is not an input projection
        cands = [
            lo
            for lo, a, b in lins
            if b == hidden and a == q_width and not any(_hint(lo, k) for k in ("query", "key", "value", "qkv"))
        ]
        outs = cands[-1:]
    roles |= {lo: (("output",), None) for lo in outs}
    inputs = [(lo, a, b) for lo, a, b in lins if lo not in roles and a == hidden]
    if len(inputs) == 1:
        lo, _a, width = inputs[0]
        kv = (width // head_dim - heads) // 2
        if width % head_dim == 0 and kv >= 1 and width == (heads + 2 * kv) * head_dim:
            make = FUSED_QKV.get(family)
            fused = make(config, heads, kv, head_dim) if make else None
            if fused is not None and fused.width != width:
                fused = None
            roles[lo] = (("query", "key", "value"), fused)
    elif len(inputs) == 3:
        roles.update(_split_qkv(inputs, q_width))
    elif len(inputs) == 2:  # query + fused key|value (JetMoE's kv_proj): the k|v layout is not known
        q = [x for x in inputs if x[2] == q_width and _hint(x[0], "query")] or [x for x in inputs if x[2] == q_width]
        if q:
            roles[q[0][0]] = (("query",), None)
            rest = next(x for x in inputs if x[0] != q[0][0])
            roles[rest[0]] = (("key", "value"), None)
    return roles


def _split_qkv(inputs: list[tuple[str, int, int]], q_width: int) -> Roles:
    """Three input projections: names if they say q, k, v; else widths (GQA), then definition order."""
    by_hint = {}
    for kind in ("query", "key", "value"):
        hits = [lo for lo, _a, _b in inputs if _hint(lo, kind)]
        if len(hits) == 1:
            by_hint[kind] = hits[0]
    if len(set(by_hint.values())) == 3:
        return {lo: ((kind,), None) for kind, lo in by_hint.items()}
    q = [x for x in inputs if x[2] == q_width]
    kv = [x for x in inputs if x[2] != q_width]
    ordered = [q[0], *kv] if len(q) == 1 and len(kv) == 2 and kv[0][2] == kv[1][2] else inputs
    return {x[0]: ((kind,), None) for x, kind in zip(ordered, ("query", "key", "value"), strict=True)}


def _ffn_roles(lins: list[tuple[str, int, int]], hidden: int, family: str, config: Any) -> Roles:
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    roles: Roles = {}
    for lo, a, b in lins:
        if a == hidden and (b == 1 or (experts and b == experts)) and b < hidden:
            roles[lo] = (None, None)  # a router (MoE gate): not an FFN projection
    rest = [x for x in lins if x[0] not in roles]
    outs = [x for x in rest if x[2] == hidden and x[1] != hidden]
    if not outs:  # in == out == hidden: the name, else the last defined
        outs = [x for x in rest if x[2] == hidden and _hint(x[0], "ffn_out")] or [x for x in rest if x[2] == hidden][
            -1:
        ]
    for lo, _a, _b in outs:
        roles[lo] = (("ffn_out",), None)
    widths = {a for _lo, a, _b in outs}
    ins = [x for x in rest if x[0] not in roles and x[1] == hidden]
    plain = [x for x in ins if x[2] in widths]
    if len(plain) == 2:  # gated: gate and up by name
        gate = [x for x in plain if _hint(x[0], "ffn_gate")]
        up = [x for x in plain if _hint(x[0], "ffn_up")]
        if len(gate) == 1 and len(up) == 1 and gate[0] != up[0]:
            roles[gate[0][0]] = (("ffn_in", "ffn_gate"), None)
            roles[up[0][0]] = (("ffn_in", "ffn_up"), None)
    for lo, _a, b in ins:
        if lo in roles:
            continue
        if b in widths:
            roles[lo] = (("ffn_in",), None)
        elif b % 2 == 0 and b // 2 in widths:  # fused gate|up
            make = FUSED_GATE_UP.get(family)
            roles[lo] = (("ffn_in", "ffn_gate", "ffn_up"), make(b // 2) if make else None)
        else:
            roles[lo] = (("ffn_in",), None)
    return roles


def name_matches(name: str, patterns: list[str]) -> bool:
    """A pattern matches a module path exactly or as a dotted suffix (``mlp.c_proj``)."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _override(structure: Structure, modules: dict[str, list[str]]) -> Structure:
    """``model.modules``: each key (role or block) set to exactly the linears its patterns match.
    A pattern must match in every layer: a list written for another family fails here, naming it."""
    linears = list(structure.linears)
    for key, patterns in modules.items():
        if key not in ROLES + BLOCKS:
            raise ConfigError(
                f"model.modules.{key}: unknown role or block (roles: {', '.join(ROLES)}; blocks: {', '.join(BLOCKS)})"
            )
        for p in patterns:
            check_every_layer(
                structure, [li for li in linears if name_matches(li.name, [p])], f"model.modules.{key}", p
            )
        for i, li in enumerate(linears):
            hit = name_matches(li.name, list(patterns))
            if key in BLOCKS:
                linears[i] = replace(li, block=key if hit else (None if li.block == key else li.block))
            else:
                roles = tuple(r for r in li.roles if r != key) + ((key,) if hit else ())
                fused = li.fused if li.fused is not None and set(roles) <= set(li.fused.roles) | {"ffn_in"} else None
                linears[i] = replace(li, roles=roles, fused=fused)
    found = {**structure.found, **{k: "model.modules" for k in modules}}
    return replace(structure, linears=tuple(linears), found=found)


def check_every_layer(structure: Structure, hits: list[LinearInfo], key: str, entry: str) -> None:
    layers = {li.layer for li in hits}
    if not layers:
        raise ConfigError(
            f"{key}: {entry!r} matches no linear of {structure.family} (layer 0 has: {structure.describe_layer(0)})"
        )
    missing = sorted(set(range(structure.num_layers)) - layers)
    if missing:
        raise ConfigError(
            f"{key}: {entry!r} matches linears in {len(layers)} of {structure.num_layers} layers of "
            f"{structure.family} but none in layer(s) {missing[:8]} (layer {missing[0]} has: "
            f"{structure.describe_layer(missing[0])})"
        )


def cross_check_peft(structure: Structure) -> None:
    """Detected roles against peft's per-family tables (imported, never copied): every module peft
    targets for this family exists in layer 0, and peft's IA3 feed-forward modules are our
    ``ffn_out``. A disagreement means the detection is wrong for this family: fail, naming it."""
    family = structure.family
    layer0 = structure.in_layer(0)
    named = getattr(peft_tables, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING", {}).get(family, []) + getattr(
        peft_tables, "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING", {}
    ).get(family, [])
    fused_moe = any(b.fused for b in structure.moe)
    for name in dict.fromkeys(named):
        if not any(name_matches(li.name, [name]) for li in layer0):
            if fused_moe:  # peft's tables name per-expert linears (Mixtral's w2): fused 3-D tensors here
                continue
            raise ConfigError(
                f"peft targets {name!r} in {family} models, but layer 0 of this checkpoint has no such "
                f"linear ({structure.describe_layer(0)}): name the modules in model.modules"
            )
    if structure.found.get("ffn_out") != "detected":
        return
    for name in getattr(peft_tables, "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING", {}).get(family, []):
        wrong = [li.local for li in layer0 if name_matches(li.name, [name]) and "ffn_out" not in li.roles]
        if wrong:
            raise ConfigError(
                f"peft treats {name!r} as the feed-forward output of {family}, but moe_lora detected "
                f"{wrong[0]} as {'+'.join(next(li.roles for li in layer0 if li.local == wrong[0]))}: "
                "set model.modules.ffn_out"
            )
