"""Structured config schemas, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` is typed by one of these dataclasses, so a misspelt key or a wrong
type fails when Hydra composes the config. Value checks live in ``__post_init__`` (run by
``OmegaConf.to_object``) and raise :class:`~moe_lora.errors.ConfigError` naming the key; checks that
need two groups at once (a layout against the model's depth, ``top_k`` against the experts of a
layer) live in :func:`validate`.

Schemas are stored under ``schema/<group>`` so that they never show up as choices of the group
itself; each YAML pulls its schema in with ``- /schema/<group>/<name>@_here_`` in its defaults list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from moe_lora.errors import require

TASK_TYPES = ("cbqa", "instruction")
DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "adafactor", "adafactor_t5x")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# torch.manual_seed and torch.Generator.manual_seed take [0, 2**64 - 1] (a negative seed aliases a
# large one, numpy refuses it); seeds beyond would fail only once the run folder exists
SEED_MAX = 2**64 - 1


def check_finite(node: Any, key: str = "") -> None:
    """Refuse a non-finite float anywhere in a config tree (dataclasses, dicts, lists), naming its
    dotted key. Range checks alone let them through: ``inf > 0`` holds, and ``nan`` fails every
    comparison, so ``x if x > 0 else default`` turns it into the default without a word."""
    if isinstance(node, float):
        require(math.isfinite(node), key, node, "must be a finite number")
    elif is_dataclass(node) and not isinstance(node, type):
        for f in fields(node):
            check_finite(getattr(node, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(node, dict):
        for k, v in node.items():
            check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_finite(v, f"{key}[{i}]")


def check_seed(key: str, seed: int) -> None:
    require(0 <= seed <= SEED_MAX, key, seed, "must be in [0, 2**64 - 1] (torch.manual_seed's range)")


# --------------------------------------------------------------------------------------------- model
@dataclass
class PretrainConfig:
    """How the built-in world model is pretrained (only for ``model.source=world``)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_finite(self, "model.pretrain")
        require(self.steps >= 1, "model.pretrain.steps", self.steps, "must be >= 1")
        require(self.batch_size >= 1, "model.pretrain.batch_size", self.batch_size, "must be >= 1")
        require(self.lr > 0, "model.pretrain.lr", self.lr, "must be > 0")
        require(self.warmup_steps >= 0, "model.pretrain.warmup_steps", self.warmup_steps, "must be >= 0")
        require(self.weight_decay >= 0, "model.pretrain.weight_decay", self.weight_decay, "must be >= 0")


@dataclass
class ModulesConfig:
    """Module-name patterns that override what :mod:`moe_lora.model.structure` detects, per role or
    block (null: detected). A pattern must match in every decoder layer."""

    query: Optional[List[str]] = None
    key: Optional[List[str]] = None
    value: Optional[List[str]] = None
    output: Optional[List[str]] = None
    ffn_in: Optional[List[str]] = None
    ffn_gate: Optional[List[str]] = None
    ffn_up: Optional[List[str]] = None
    ffn_out: Optional[List[str]] = None
    attention: Optional[List[str]] = None
    ffn: Optional[List[str]] = None


def module_overrides(modules: Any) -> dict[str, list[str]]:
    """The keys of ``model.modules`` that are set (a :class:`ModulesConfig` or a plain dict)."""
    items = modules.items() if isinstance(modules, dict) else vars(modules).items()
    return {k: list(v) for k, v in items if v is not None}


NULL_INITS = ("copy", "neg_inf")
WORLD_MOE_FAMILY = "qwen3_moe"  # the built-in toy MoE's architecture (model=tiny_world_moe)


@dataclass
class BaseMoEConfig:
    """An MoE base's own routing (``model.moe``; :mod:`moe_lora.routing.base_router`). Its routers
    are always watched (CV, load per task type and entropy per layer in routing.jsonl).

    ``num_experts``, ``top_k``, ``expert_size`` and ``router_aux_loss_coef`` build the built-in toy
    MoE (``model=tiny_world_moe``, :mod:`moe_lora.world.moe`) and are refused for any other model
    (a hub MoE's come from its config.json: setting them there would change nothing).
    ``train_router``: the base router's weights train (frozen by default, as LLaMA-Factory) and the
    family's load-balance loss joins the loss, weighted by ``router_aux_weight`` (null: the
    checkpoint's ``router_aux_loss_coef``). ``null_experts``: AdaMoE's null experts added to every
    base router (output zero, no expert FLOPs), with top-k ``null_top_k`` (null: the base's) and the
    new router rows initialised by ``null_init`` (``copy``: copies of the real rows, the authors'
    setting; ``neg_inf``: never chosen, the base's output unchanged at the base's top-k)."""

    num_experts: Optional[int] = None
    top_k: Optional[int] = None
    expert_size: Optional[int] = None
    router_aux_loss_coef: Optional[float] = None
    train_router: bool = False
    router_aux_weight: Optional[float] = None
    null_experts: int = 0
    null_top_k: Optional[int] = None
    null_init: str = "copy"

    def __post_init__(self) -> None:
        check_finite(self, "model.moe")
        for key in ("num_experts", "top_k", "expert_size"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"model.moe.{key}", value, "must be >= 1")
        require(
            self.top_k is None or self.num_experts is None or self.top_k <= self.num_experts,
            "model.moe.top_k",
            self.top_k,
            f"must be <= model.moe.num_experts={self.num_experts}",
        )
        require(
            self.router_aux_loss_coef is None or self.router_aux_loss_coef >= 0,
            "model.moe.router_aux_loss_coef",
            self.router_aux_loss_coef,
            "must be >= 0",
        )
        require(
            self.router_aux_weight is None or self.router_aux_weight >= 0,
            "model.moe.router_aux_weight",
            self.router_aux_weight,
            "must be >= 0 or null",
        )
        require(
            self.router_aux_weight is None or self.train_router,
            "model.moe.router_aux_weight",
            self.router_aux_weight,
            "weights the loss of a trained base router: set model.moe.train_router=true",
        )
        require(self.null_experts >= 0, "model.moe.null_experts", self.null_experts, "must be >= 0")
        require(
            self.null_top_k is None or self.null_experts > 0,
            "model.moe.null_top_k",
            self.null_top_k,
            "needs model.moe.null_experts > 0",
        )
        require(
            self.null_top_k is None or self.null_top_k >= 1, "model.moe.null_top_k", self.null_top_k, "must be >= 1"
        )
        require(
            self.null_init in NULL_INITS,
            "model.moe.null_init",
            self.null_init,
            f"must be one of {', '.join(NULL_INITS)}",
        )

    def architecture(self) -> dict[str, Any]:
        """The toy MoE's fields of transformers' ``Qwen3MoeConfig``: every layer sparse, the top-k
        weights renormalised (``norm_topk_prob``, as the released Qwen3-MoE and Mixtral)."""
        return dict(
            num_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            moe_intermediate_size=self.expert_size,
            router_aux_loss_coef=self.router_aux_loss_coef,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )


@dataclass
class ModelConfig:
    """A base model. ``modules`` is empty by default: the roles (query, key, value, output, ffn_in,
    ffn_gate, ffn_up, ffn_out) and blocks (attention, ffn) are read from the model itself
    (:mod:`moe_lora.model.structure`); a key set here overrides that key with module-name patterns.

    ``source=world`` builds the tiny Llama from the architecture fields and pretrains it on the
    built-in world (cached). ``source=hub`` loads ``name_or_path`` with transformers; the
    architecture fields then describe the real model so that parameters can be counted without
    downloading it.
    """

    name: str = MISSING
    source: str = "hub"
    name_or_path: Optional[str] = None
    # a GGUF file (llama.cpp's format) instead of name_or_path: dequantized to model.dtype once and
    # cached (model/gguf.py); with gguf_package, the file ships inside that installed distribution
    gguf_file: Optional[str] = None
    gguf_package: Optional[str] = None
    chat_template: bool = False  # an instruction-tuned model: data.chat_template=null follows this
    family: str = "llama"
    modules: ModulesConfig = field(default_factory=ModulesConfig)
    # Architecture fields: for source=world they define the model; for source=hub they are only a
    # fallback for meta-device accounting of a model that is not on disk (a readable config.json
    # always wins, see models.read_architecture).
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 512
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    vocab_size: Optional[int] = None
    tie_word_embeddings: bool = False
    # encoder-decoders (T5): auto reads config.is_encoder_decoder (else the family); num_layers is
    # then the encoder's, num_decoder_layers the decoder's (None: as many), feed_forward_proj T5's
    architecture: str = "auto"
    num_decoder_layers: Optional[int] = None
    feed_forward_proj: Optional[str] = None
    # further fields of the family's transformers config, in its own names (an MoE's experts, top-k,
    # expert size, sparse/dense layers: Mixtral's num_local_experts, Qwen3-MoE's moe_intermediate_size):
    # like the fields above, only a fallback for counting a hub model that is not on disk
    config_fields: Dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"  # the frozen base weights; adapters have their own adapter.dtype
    trust_remote_code: bool = False
    # auto: sdpa where the architecture supports it, else what transformers picks (eager)
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing of the decoder layers
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    moe: BaseMoEConfig = field(default_factory=BaseMoEConfig)  # an MoE base's own router (issue 32)

    def __post_init__(self) -> None:
        require(self.source in ("world", "hub"), "model.source", self.source, "must be 'world' or 'hub'")
        if self.source == "hub":
            require(
                bool(self.name_or_path or self.gguf_file),
                "model.name_or_path",
                self.name_or_path,
                "is required for model.source=hub (or model.gguf_file)",
            )
        require(
            self.source == "hub" or not self.gguf_file,
            "model.gguf_file",
            self.gguf_file,
            f"needs model.source=hub (model.source={self.source})",
        )
        require(
            not self.gguf_package or bool(self.gguf_file),
            "model.gguf_package",
            self.gguf_package,
            "names the distribution that ships model.gguf_file, which is not set",
        )
        require(self.num_layers >= 1, "model.num_layers", self.num_layers, "must be >= 1")
        for key in ("hidden_size", "intermediate_size", "num_heads"):
            require(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "must be >= 1")
        for key in ("num_kv_heads", "head_dim", "vocab_size", "num_decoder_layers"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"model.{key}", value, "must be >= 1 or null")
        require(
            self.architecture in ("auto", "causal", "seq2seq"),
            "model.architecture",
            self.architecture,
            "must be auto, causal or seq2seq",
        )
        require(self.dtype in DTYPES, "model.dtype", self.dtype, "must be float32, bfloat16 or float16")
        require(
            self.source == "hub" or not self.config_fields,
            "model.config_fields",
            dict(self.config_fields),
            "describes a hub model that is not on disk (model.source=hub); the built-in models use model.moe",
        )
        world_moe = self.source == "world" and self.family == WORLD_MOE_FAMILY
        for key in ("num_experts", "top_k", "expert_size", "router_aux_loss_coef"):  # the toy MoE's architecture
            value = getattr(self.moe, key)
            require(
                (value is not None) == world_moe,
                f"model.moe.{key}",
                value,
                f"is required by the built-in MoE (model.source=world, model.family={WORLD_MOE_FAMILY})"
                if world_moe
                else "builds the built-in MoE (model=tiny_world_moe) only; a hub MoE's is read from its config.json",
            )
        require(
            self.attn_implementation in ATTN_IMPLEMENTATIONS,
            "model.attn_implementation",
            self.attn_implementation,
            f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}",
        )

    @property
    def total_layers(self) -> int:
        """Layers a layout spans: the encoder's, then the decoder's, for an encoder-decoder."""
        if self.architecture == "seq2seq":
            return self.num_layers + (self.num_decoder_layers or self.num_layers)
        return self.num_layers


# ------------------------------------------------------------------------------------------ adapters
@dataclass
class AdapterConfig:
    """Fields every adapter has. ``target_modules`` entries are module names or group names of
    ``model.modules`` (``ffn``, ``attention``, ``all``); names match a module path by suffix."""

    name: str = MISSING
    target_modules: List[str] = field(default_factory=lambda: ["ffn"])
    # Adapter weights, routers, adapter buffers (and so the optimizer state) are kept in this dtype
    # whatever model.dtype is: pure-bf16 AdamW loses small updates (PEFT's autocast_adapter_dtype).
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_finite(self, "adapter")  # the whole variant's config: subclasses call this first
        require(len(self.target_modules) > 0, "adapter.target_modules", self.target_modules, "must not be empty")
        require(self.dtype in DTYPES, "adapter.dtype", self.dtype, "must be float32, bfloat16 or float16")


@dataclass
class LowRankConfig(AdapterConfig):
    """LoRA-shaped update ``s * B A x`` with ``s = alpha / rank`` (peft's defaults)."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    init_A: str = "kaiming"  # kaiming: peft's kaiming-uniform(a=sqrt 5); normal: N(0, 0.02^2) (MoLoRA)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.rank >= 1, "adapter.rank", self.rank, "must be >= 1")
        # the update is scaled by alpha / rank: 0 trains nothing (B's gradient is 0 too) and reports
        # the base model as the tuned one; a negative alpha flips the update's sign
        require(self.alpha > 0, "adapter.alpha", self.alpha, "must be > 0 (the update is scaled by alpha / rank)")
        require(0.0 <= self.dropout < 1.0, "adapter.dropout", self.dropout, "must be in [0, 1)")
        require(self.init_A in ("kaiming", "normal"), "adapter.init_A", self.init_A, "must be 'kaiming' or 'normal'")


@dataclass
class RoutedConfig(AdapterConfig):
    """Fields of every routed adapter: the experts, the router, and the weights that switch the
    shared auxiliary losses of :mod:`moe_lora.routing.losses` on. ``top_k=None`` is soft routing
    over all experts. MoV's IA3 experts take only these; low-rank experts add :class:`MoEConfig`'s."""

    num_experts: int = 8
    top_k: Optional[int] = None
    lb_weight: float = 0.0
    z_loss_weight: float = 0.0
    # load balance and z-loss over real tokens only; false counts padding too (LoRAMoE's LBC has its
    # own switch, adapter.lbc_mask_padding)
    aux_mask_padding: bool = True
    # data parallel: local = each rank's auxiliary losses on its own tokens (HF Mixtral, DeepSpeed-MoE,
    # LoRAMoE's code); global = balance statistics summed over ranks first (Megatron), equal to the
    # one-process loss of the global batch
    aux_scope: str = "local"
    router_jitter: float = 0.0
    router_fp32: bool = True
    # kaiming: nn.Linear's default (LoRAMoE's code); normal: N(0, 0.02^2) (the MoV paper's T5X router)
    router_init: str = "kaiming"

    def router_outputs(self) -> tuple[int, str]:
        """The router's number of outputs, and how an error message names it."""
        return self.num_experts, f"adapter.num_experts={self.num_experts}"

    def aux_losses(self) -> dict[str, Any]:
        """The fields of the recorder's ``AuxLossConfig`` this config switches on."""
        return {
            "lb_weight": self.lb_weight,
            "z_loss_weight": self.z_loss_weight,
            "aux_mask_padding": self.aux_mask_padding,
            "aux_scope": self.aux_scope,
        }

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.num_experts >= 1, "adapter.num_experts", self.num_experts, "must be >= 1")
        if self.top_k is not None:
            outputs, named = self.router_outputs()
            require(self.top_k >= 1, "adapter.top_k", self.top_k, "must be >= 1 (or null for soft routing)")
            require(self.top_k <= outputs, "adapter.top_k", self.top_k, f"exceeds {named}")
        for key in ("lb_weight", "z_loss_weight", "router_jitter"):
            require(getattr(self, key) >= 0, f"adapter.{key}", getattr(self, key), "must be >= 0")
        require(self.aux_scope in ("local", "global"), "adapter.aux_scope", self.aux_scope, "must be local or global")
        require(
            self.router_init in ("kaiming", "normal"),
            "adapter.router_init",
            self.router_init,
            "must be kaiming or normal",
        )


@dataclass
class MoEConfig(LowRankConfig, RoutedConfig):
    """Routed low-rank experts: :class:`LowRankConfig`'s expert shape, :class:`RoutedConfig`'s
    router, plus null experts and the expert compute path."""

    num_null_experts: int = 0
    # "dense": every expert on every token, unselected ones gated by zero (fastest for E < 16 x
    # top_k on CPU); "grouped": only the top-k (token, expert) pairs, E/k times fewer expert FLOPs:
    # CSR kernels on the CPU (adapters/csr.py), grouped GEMMs (``torch._grouped_mm``) on a GPU and
    # compiled. Same results up to summation order; on CUDA its index_add_ uses atomics, so runs are
    # bitwise reproducible only under torch.use_deterministic_algorithms(True). "auto": grouped in
    # the layers where it is the faster path (top-k routing with num_experts >= 16 x top_k, measured
    # on CPU; for the grouped GEMM its 16-byte rows and bfloat16 compute on CUDA or compiled), dense
    # elsewhere (adapters/layer.py).
    expert_compute: str = "dense"

    def router_outputs(self) -> tuple[int, str]:
        nulls = f" + adapter.num_null_experts={self.num_null_experts}" if self.num_null_experts else ""
        return self.num_experts + self.num_null_experts, f"adapter.num_experts={self.num_experts}{nulls}"

    def __post_init__(self) -> None:
        require(self.num_null_experts >= 0, "adapter.num_null_experts", self.num_null_experts, "must be >= 0")
        super().__post_init__()
        require(
            self.expert_compute in ("dense", "grouped", "auto"),
            "adapter.expert_compute",
            self.expert_compute,
            "must be 'dense', 'grouped' or 'auto'",
        )
        if self.expert_compute == "grouped":
            import torch

            require(
                self.top_k is not None,
                "adapter.expert_compute",
                self.expert_compute,
                "needs top-k routing (set adapter.top_k); soft routing uses every expert",
            )
            require(
                hasattr(torch, "_grouped_mm"),
                "adapter.expert_compute",
                self.expert_compute,
                f"needs torch._grouped_mm (torch >= 2.8; this is {torch.__version__})",
            )
        require(
            self.num_null_experts == 0 or self.top_k is not None,
            "adapter.num_null_experts",
            self.num_null_experts,
            "needs top-k routing (set adapter.top_k)",
        )


# ---------------------------------------------------------------------------------------------- layout
# Named depth profiles, w(x) = 1 + a x + b (x^2 - mean x^2) over layer (or group) positions x in
# [-1, 1]: (a, b). At 4 groups they give MoLA's 8,6,4,2 / 2,4,6,8 / 8,2,2,8 / 5,5,5,5 exactly at a
# mean of 5 experts per layer; diamond (2,8,8,2) is our reading of "more experts in middle layers".
PROFILES = {
    "rectangle": (0.0, 0.0),
    "triangle": (-0.8, 0.0),
    "inverted_triangle": (0.8, 0.0),
    "hourglass": (0.0, 2.4),
    "diamond": (0.0, -2.4),
}


@dataclass
class BudgetConfig:
    """The experts a budget-first layout spends: ``total`` over all layers, or ``per_layer_mean``
    times the layers; neither: the adapter's own ``num_experts`` per layer (so uniform spends the
    same). ``unit``: ``experts``, or ``expert_rank`` (experts x rank, which equals experts x
    ``adapter.rank`` while the rank is the same in every layer)."""

    unit: str = "experts"
    total: Optional[int] = None
    per_layer_mean: Optional[float] = None

    def __post_init__(self) -> None:
        check_finite(self, "layout.budget")
        require(
            self.unit in ("experts", "expert_rank"), "layout.budget.unit", self.unit, "must be experts or expert_rank"
        )
        require(self.total is None or self.total >= 1, "layout.budget.total", self.total, "must be >= 1 or null")
        require(
            self.per_layer_mean is None or self.per_layer_mean > 0,
            "layout.budget.per_layer_mean",
            self.per_layer_mean,
            "must be > 0 or null",
        )
        require(
            self.total is None or self.per_layer_mean is None,
            "layout.budget.total",
            self.total,
            "give total or per_layer_mean, not both",
        )


@dataclass
class LayoutConfig:
    """Experts (and optionally rank / top_k) per layer.

    Either explicit lists of length L (per layer) or G (per group of layers; layer l is in group
    floor(l * G / L)), or budget-first: a depth ``profile`` (a name of :data:`PROFILES`, or an
    unnamed ``slope`` / ``curvature``) or ``weights`` (per group or per layer) projected exactly onto ``budget`` within
    [``min_experts``, ``max_experts``] (``layouts.project``); ``granularity: group`` gives every
    layer of one of ``groups`` groups the same weight. Nothing set is uniform."""

    name: str = "uniform"
    experts: Optional[List[int]] = None
    rank: Optional[List[int]] = None
    top_k: Optional[List[int]] = None
    profile: Optional[str] = None
    weights: Optional[List[float]] = None
    slope: Optional[float] = None  # an unnamed profile: (a, b) of w(x) (layout search's space)
    curvature: Optional[float] = None
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    min_experts: Optional[int] = None  # default: the adapter's top_k (1 without top-k routing)
    max_experts: Optional[int] = None
    granularity: str = "group"
    groups: int = 4

    def __post_init__(self) -> None:
        check_finite(self, "layout")  # a nan slope or weight would give a uniform layout silently
        for key in ("experts", "rank", "top_k"):
            values = getattr(self, key)
            if values is not None:
                require(
                    len(values) > 0 and all(v >= 1 for v in values),
                    f"layout.{key}",
                    values,
                    "must be a non-empty list of positive integers",
                )
        require(
            self.profile is None or self.profile in PROFILES,
            "layout.profile",
            self.profile,
            f"must be one of {', '.join(PROFILES)} or null",
        )
        require(
            self.weights is None
            or (len(self.weights) > 0 and all(w >= 0 for w in self.weights) and sum(self.weights) > 0),
            "layout.weights",
            self.weights,
            "must be non-negative numbers, not all zero",
        )
        require(
            self.profile is None or self.weights is None,
            "layout.weights",
            self.weights,
            "give layout.profile or layout.weights, not both",
        )
        require(
            self.experts is None or (self.profile is None and self.weights is None),
            "layout.experts",
            self.experts,
            "an explicit list and a profile/weights exclude each other",
        )
        require(
            self.granularity in ("group", "layer"), "layout.granularity", self.granularity, "must be group or layer"
        )
        require(self.groups >= 1, "layout.groups", self.groups, "must be >= 1")
        require(
            self.min_experts is None or self.min_experts >= 1, "layout.min_experts", self.min_experts, "must be >= 1"
        )
        require(
            self.max_experts is None or self.max_experts >= (self.min_experts or 1),
            "layout.max_experts",
            self.max_experts,
            "must be >= layout.min_experts",
        )

    @property
    def budget_first(self) -> bool:
        return any(v is not None for v in (self.profile, self.weights, self.slope, self.curvature))

    @property
    def shape(self) -> tuple[float, float] | None:
        """(slope, curvature) of the depth profile: a named one's, or the unnamed one's."""
        if self.profile is not None:
            return PROFILES[self.profile]
        if self.slope is not None or self.curvature is not None:
            return (self.slope or 0.0, self.curvature or 0.0)
        return None


# ------------------------------------------------------------------------------------------------ data
@dataclass
class WorldConfig:
    """The built-in synthetic world: people, attributes, paraphrased biographies, QA pairs."""

    seed: int = 0
    num_people: int = 200
    bios_per_person: int = 5
    trained_fraction: float = 0.5  # people whose QA pairs appear in pretraining and fine-tuning

    def __post_init__(self) -> None:
        check_finite(self, "data.world")
        check_seed("data.world.seed", self.seed)
        require(self.num_people >= 8, "data.world.num_people", self.num_people, "must be >= 8")
        require(self.bios_per_person >= 1, "data.world.bios_per_person", self.bios_per_person, "must be >= 1")
        require(
            0.0 < self.trained_fraction < 1.0, "data.world.trained_fraction", self.trained_fraction, "must be in (0, 1)"
        )


@dataclass
class SourceConfig:
    """One real dataset of the mix, read through ``datasets`` (see ``moe_lora/data/sources.py``).

    ``path`` is a hub id (looked up under ``data.root/<name>`` first, then the local ``datasets``
    cache; downloads only with ``HF_DATASETS_OFFLINE=0``), a local folder written by
    ``save_to_disk``, or JSON / JSONL / parquet files (a file, a glob or a folder of them).
    ``fields`` maps roles to columns (dotted paths reach nested columns, e.g. ``answer.aliases``):
    CBQA sources use ``question`` and ``answers`` (a string or a list; the first one is the training
    target) and optionally ``aliases`` (accepted answers; default ``answers``); instruction sources
    use ``output`` plus the roles their template reads (``instruction``, ``input`` (optional), or
    ``question`` for GSM8K); any source may map ``id``. An unmapped role reads the column of the same
    name. An empty ``description`` uses the template's own (nq_open's ``Answer these questions:``).
    ``template`` is a prompt template name of ``data/templates.py`` or a format string over the
    roles. CBQA sources with an ``eval_split`` are evaluated by greedy generation cut at ``stop``
    and matched by ``match`` (lm-eval's ``triviaqa`` or ``nq_open`` rules); instruction sources by
    held-out response loss.
    """

    path: str = MISSING
    config: Optional[str] = None
    split: Optional[str] = "train"  # training split (null: evaluation only)
    eval_split: Optional[str] = None  # held-out split for evaluation (null: not evaluated)
    task_type: str = "cbqa"
    num_examples: Optional[int] = None  # training examples taken; null: weight x data.num_train
    weight: float = 1.0  # share of data.num_train when num_examples is null (normalised over sources)
    eval_examples: Optional[int] = None  # cap on evaluation examples (recipe.eval_limit also applies)
    fields: Dict[str, str] = field(default_factory=dict)
    template: str = "triviaqa"
    description: str = ""  # text before the (few-shot) prompt, e.g. nq_open's "Answer these questions:"
    match: str = "triviaqa"
    stop: List[str] = field(default_factory=lambda: ["\n", ".", ","])

    def __post_init__(self) -> None:
        check_finite(self, "data.sources.<name>")
        require(
            self.task_type in TASK_TYPES,
            "data.sources.<name>.task_type",
            self.task_type,
            f"must be one of {', '.join(TASK_TYPES)}",
        )
        require(
            self.match in ("triviaqa", "nq_open", "exact"),
            "data.sources.<name>.match",
            self.match,
            "must be triviaqa, nq_open or exact",
        )
        require(
            self.num_examples is None or self.num_examples >= 0,
            "data.sources.<name>.num_examples",
            self.num_examples,
            "must be >= 0 or null",
        )
        require(self.weight >= 0, "data.sources.<name>.weight", self.weight, "must be >= 0")
        require(
            self.eval_examples is None or self.eval_examples >= 1,
            "data.sources.<name>.eval_examples",
            self.eval_examples,
            "must be >= 1 or null (no evaluation: eval_split=null)",
        )
        require(
            self.split is not None or self.eval_split is not None,
            "data.sources.<name>.split",
            self.split,
            "and eval_split are both null: the source would not be used",
        )


@dataclass
class P3Config:
    """The T0 mixture from P3's configs under ``data.root`` (``data/p3.py``): datasets by P3's config
    prefix, their task clusters, T0's per-dataset cap, splits, and evaluation templates."""

    train_datasets: List[str] = field(default_factory=list)
    eval_datasets: List[str] = field(default_factory=list)
    clusters: Dict[str, str] = field(default_factory=dict)  # dataset -> task cluster (kept as subtask)
    cap: int = 500_000  # examples per dataset, split evenly over its templates (T0)
    train_split: str = "train"
    eval_split: str = "validation"
    eval_examples: Optional[int] = None  # rows per evaluation template (recipe.eval_limit also applies)
    eval_templates: Dict[str, List[str]] = field(default_factory=dict)  # dataset -> templates (default: all)

    @property
    def enabled(self) -> bool:
        return bool(self.train_datasets or self.eval_datasets)

    def __post_init__(self) -> None:
        require(self.cap >= 1, "data.p3.cap", self.cap, "must be >= 1")
        require(
            self.eval_examples is None or self.eval_examples >= 1,
            "data.p3.eval_examples",
            self.eval_examples,
            "must be >= 1 or null",
        )
        for name in self.eval_templates:
            require(
                name in self.eval_datasets, f"data.p3.eval_templates.{name}", name, "is not in data.p3.eval_datasets"
            )


FACT_RELATIONS = ("capital", "currency", "symbol", "element")


@dataclass
class FactsConfig:
    """Real facts from installed packages (``data/facts.py``, ``data=facts_world``): closed-book
    questions about countries and chemical elements, split once (by ``seed``, the same for every
    run seed) into training facts and held-out facts, and the held-out ones into those the base
    model knows (it answers their calibration question) and not. Knowledge retained is measured on
    the known ones, asked with other templates; the instruction side is the world's tasks."""

    relations: List[str] = field(default_factory=list)  # capital, currency, symbol, element; empty: off
    per_relation: Optional[int] = None  # facts per relation (a sample fixed by seed); null: all
    train_fraction: float = 0.3  # facts whose questions make the CBQA share of training
    eval_examples: Optional[int] = None  # cap on the known held-out facts scored
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.relations)

    def __post_init__(self) -> None:
        check_finite(self, "data.facts")
        check_seed("data.facts.seed", self.seed)
        for name in self.relations:
            require(name in FACT_RELATIONS, "data.facts.relations", name, f"is not one of {', '.join(FACT_RELATIONS)}")
        require(
            len(set(self.relations)) == len(self.relations),
            "data.facts.relations",
            self.relations,
            "lists a relation twice",
        )
        require(
            self.per_relation is None or self.per_relation >= 1,
            "data.facts.per_relation",
            self.per_relation,
            "must be >= 1 or null",
        )
        require(0.0 < self.train_fraction < 1.0, "data.facts.train_fraction", self.train_fraction, "must be in (0, 1)")
        require(
            self.eval_examples is None or self.eval_examples >= 1,
            "data.facts.eval_examples",
            self.eval_examples,
            "must be >= 1 or null",
        )


@dataclass
class DataConfig:
    """The fine-tuning mix. With ``sources`` empty it is the built-in world: instruction examples
    plus a ``cbqa_ratio`` share of CBQA pairs about trained people. With ``sources`` it is real
    datasets (``data/sources.py``). Every example carries its task type (``cbqa`` or
    ``instruction``)."""

    name: str = "world_mix"
    sources: Dict[str, SourceConfig] = field(default_factory=dict)
    p3: P3Config = field(default_factory=P3Config)  # the T0 mixture (data=p3_t0) instead of sources
    root: Optional[str] = None  # folder of prepared datasets (<root>/<source name>), checked first
    facts: FactsConfig = field(default_factory=FactsConfig)  # real facts (data=facts_world) instead of the world's
    chat_template: Optional[bool] = None  # wrap prompts in the tokenizer's chat template; null: model.chat_template
    num_proc: Optional[int] = None  # datasets.map workers for tokenisation
    world: WorldConfig = field(default_factory=WorldConfig)
    num_train: int = 2000
    cbqa_ratio: float = 0.1
    instruction_tasks: List[str] = field(default_factory=lambda: ["reverse", "sort", "upper"])
    min_items: int = 2  # list length of instruction examples
    max_items: int = 3
    eval_per_task: int = 100
    # the toy T0 (data=world_t0): multiple-choice world tasks of these clusters (data/world.py
    # MC_CLUSTERS) train; those of mc_eval_clusters are held out and judged by rank classification
    mc_train_clusters: List[str] = field(default_factory=list)
    mc_eval_clusters: List[str] = field(default_factory=list)
    max_length: int = 64  # causal LMs: prompt + answer tokens
    # encoder-decoders: source (prompt + EOS) and target (answer + EOS) tokens; null: data.max_length
    max_source_length: Optional[int] = None
    max_target_length: Optional[int] = None

    def lengths(self, seq2seq: bool) -> int | tuple[int, int]:
        """What ``data.collate`` encodes to: one length, or (source, target) for an encoder-decoder."""
        if not seq2seq:
            return self.max_length
        return (self.max_source_length or self.max_length, self.max_target_length or self.max_length)

    def __post_init__(self) -> None:
        check_finite(self, "data")
        require(0.0 <= self.cbqa_ratio <= 1.0, "data.cbqa_ratio", self.cbqa_ratio, "must be in [0, 1]")
        require(self.num_train >= 1, "data.num_train", self.num_train, "must be >= 1")
        require(self.eval_per_task >= 1, "data.eval_per_task", self.eval_per_task, "must be >= 1")
        require(
            1 <= self.min_items <= self.max_items <= 10,
            "data.max_items",
            self.max_items,
            f"must be in [data.min_items={self.min_items}, 10]",
        )
        require(self.max_length >= 8, "data.max_length", self.max_length, "must be >= 8")
        for key in ("max_source_length", "max_target_length"):
            value = getattr(self, key)
            require(value is None or value >= 2, f"data.{key}", value, "must be >= 2 or null")
        require(self.num_proc is None or self.num_proc >= 1, "data.num_proc", self.num_proc, "must be >= 1 or null")


# ---------------------------------------------------------------------------------------------- recipe
@dataclass
class RecipeConfig:
    """Optimisation: AdamW with a warmup + decay schedule (or Adafactor at a constant rate, as MoV
    and T-Few train IA3-style vectors), gradient accumulation, clipping."""

    name: str = "quick"
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps
    precision: str = "auto"  # auto (follows model.dtype), fp32, bf16 (autocast), fp16 (autocast + GradScaler)
    max_steps: int = 600
    # adamw | adafactor (transformers', fixed lr, T-Few's) | adafactor_t5x (the MoV paper's T5X
    # settings: parameter-scaled, clip 1.0, decay 0.8, no momentum): both need scheduler=constant
    optimizer: str = "adamw"
    lr: float = 1e-3
    batch_size: int = 16
    grad_accum: int = 1
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 10
    eval_limit: Optional[int] = None  # cap on evaluation examples per split (smoke runs)
    threads: Optional[int] = None  # torch intra-op threads; None = all cores
    compile: bool = False  # whole-model torch.compile for the training forward
    objective: str = "metrics.cbqa_em"  # what a sweeper optimises
    objectives: List[str] = field(default_factory=list)  # several (multi-objective search): a tuple
    realloc_every: Optional[int] = None  # rank reallocation period (ALoRA); None = max_steps // 4
    realloc_prune: int = 4  # components moved per reallocation
    realloc_val_examples: int = 64  # validation examples that score components
    save_init_adapter: bool = False  # also save the adapter at initialisation (asymmetry analysis)
    # data parallel: batch_size is per rank (global batch = batch_size x ranks); lr is never scaled
    strategy: str = "ddp"  # ddp (trainable tensors reduced) | fsdp (FSDP2, frozen base sharded too)
    # checkpoints/step-<n> every save_every steps (null: only at the end and on SIGTERM / SIGUSR2)
    save_every: Optional[int] = None
    keep_checkpoints: int = 2  # newest checkpoints kept
    # keep the final checkpoint's optimizer state after a finished run (removed by default: results.json ends the run)
    keep_final_state: bool = False
    on_nonfinite: str = "stop"  # stop: fail naming the step and module; skip: skip the step (counted)
    nproc_per_node: int = 1  # local worker processes a Hydra job starts itself (1 under torchrun/SLURM tasks)
    # token: cross-entropy summed over the global batch's label tokens / their count (every token
    # weighs the same); sequence: each sequence's mean, averaged over sequences (T5X's per-sequence
    # average, the MoV paper's)
    loss_normalization: str = "token"
    # validation loss (metrics.jsonl val_loss) every val_every steps and at the last step, on the
    # mixture's held-out validation examples; 0: off. Never changes training (weights bitwise equal)
    val_every: int = 0
    val_batches: int = 0  # validation batches of batch_size x ranks examples scored each time; 0: all

    def __post_init__(self) -> None:
        check_finite(self, "recipe")
        require(self.max_steps >= 1, "recipe.max_steps", self.max_steps, "must be >= 1")
        require(
            self.precision in ("auto", "fp32", "bf16", "fp16"),
            "recipe.precision",
            self.precision,
            "must be auto, fp32, bf16 or fp16",
        )
        require(self.lr > 0, "recipe.lr", self.lr, "must be > 0")
        require(self.weight_decay >= 0, "recipe.weight_decay", self.weight_decay, "must be >= 0")
        require(self.threads is None or self.threads >= 1, "recipe.threads", self.threads, "must be >= 1 or null")
        require(self.batch_size >= 1, "recipe.batch_size", self.batch_size, "must be >= 1")
        require(self.grad_accum >= 1, "recipe.grad_accum", self.grad_accum, "must be >= 1")
        require(
            self.scheduler in ("cosine", "linear", "constant", "constant_with_warmup"),
            "recipe.scheduler",
            self.scheduler,
            "must be cosine, linear, constant or constant_with_warmup",
        )
        require(0.0 <= self.warmup_ratio < 1.0, "recipe.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        require(self.optimizer in OPTIMIZERS, "recipe.optimizer", self.optimizer, f"must be {' or '.join(OPTIMIZERS)}")
        # The MoV paper trains Adafactor at a constant rate; a schedule on top of it would be a third
        # recipe that no paper ran, so it is refused rather than silently dropped.
        require(
            not self.optimizer.startswith("adafactor") or self.scheduler == "constant",
            "recipe.scheduler",
            self.scheduler,
            f"must be constant with recipe.optimizer={self.optimizer} (the MoV paper's constant rate)",
        )
        require(self.log_every >= 1, "recipe.log_every", self.log_every, "must be >= 1")
        require(
            self.eval_limit is None or self.eval_limit >= 1,
            "recipe.eval_limit",
            self.eval_limit,
            "must be >= 1 or null",
        )
        require(
            self.realloc_every is None or self.realloc_every >= 1,
            "recipe.realloc_every",
            self.realloc_every,
            "must be >= 1 or null",
        )
        require(self.realloc_prune >= 0, "recipe.realloc_prune", self.realloc_prune, "must be >= 0")
        require(
            self.realloc_val_examples >= 1,
            "recipe.realloc_val_examples",
            self.realloc_val_examples,
            "must be >= 1 (ALoRA scores components on them)",
        )
        require(self.strategy in ("ddp", "fsdp"), "recipe.strategy", self.strategy, "must be ddp or fsdp")
        require(self.nproc_per_node >= 1, "recipe.nproc_per_node", self.nproc_per_node, "must be >= 1")
        require(
            self.save_every is None or self.save_every >= 1,
            "recipe.save_every",
            self.save_every,
            "must be >= 1 or null",
        )
        require(self.keep_checkpoints >= 1, "recipe.keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        require(self.on_nonfinite in ("stop", "skip"), "recipe.on_nonfinite", self.on_nonfinite, "must be stop or skip")
        require(
            self.loss_normalization in ("token", "sequence"),
            "recipe.loss_normalization",
            self.loss_normalization,
            "must be token or sequence",
        )
        require(self.val_every >= 0, "recipe.val_every", self.val_every, "must be >= 0 (0: no validation loss)")
        require(self.val_batches >= 0, "recipe.val_batches", self.val_batches, "must be >= 0 (0: every example)")


# ------------------------------------------------------------------------------------------------ eval
@dataclass
class HarnessConfig:
    """lm-evaluation-harness on the in-memory adapted model (optional extra ``.[eval]``)."""

    tasks: List[str] = field(default_factory=list)  # e.g. [arc_easy, boolq, mmlu, gsm8k]; empty: off
    limit: Optional[float] = None  # examples per task (or a fraction below 1)
    num_fewshot: Optional[int] = None  # null: each task's own default
    batch_size: int = 8
    include_path: Optional[str] = None  # folder of custom task YAMLs (TaskManager(include_path=...))

    def __post_init__(self) -> None:
        check_finite(self, "eval.harness")
        require(self.limit is None or self.limit > 0, "eval.harness.limit", self.limit, "must be > 0 or null")
        require(
            self.num_fewshot is None or self.num_fewshot >= 0,
            "eval.harness.num_fewshot",
            self.num_fewshot,
            "must be >= 0 or null",
        )
        require(self.batch_size >= 1, "eval.harness.batch_size", self.batch_size, "must be >= 1")


@dataclass
class EvalConfig:
    """Evaluation of the base and the tuned model: CBQA by greedy generation (k-shot from the train
    split), held-out response loss, and optionally lm-evaluation-harness tasks."""

    name: str = "default"
    num_fewshot: int = 0  # CBQA shots taken from each source's train split
    max_new_tokens: int = 32
    batch_size: int = 32
    # rank classification: a choice's score is the summed log-probability of its tokens plus EOS
    # (T0 and the MoV paper); true divides it by that token count (lm-eval's acc_norm is per byte)
    rank_length_normalize: bool = False
    harness: HarnessConfig = field(default_factory=HarnessConfig)

    def __post_init__(self) -> None:
        require(self.num_fewshot >= 0, "eval.num_fewshot", self.num_fewshot, "must be >= 0")
        require(self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens, "must be >= 1")
        require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")


# ---------------------------------------------------------------------------------------------- logger
@dataclass
class WandbConfig:
    """W&B is opt-in; ``mode`` is always passed explicitly so wandb never prompts or blocks."""

    enabled: bool = False
    project: str = "moe_lora"
    entity: Optional[str] = None
    mode: str = "offline"
    tags: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(
            self.mode in ("online", "offline", "disabled"),
            "logger.wandb.mode",
            self.mode,
            "must be online, offline or disabled",
        )


@dataclass
class LoggerConfig:
    name: str = "jsonl"
    wandb: WandbConfig = field(default_factory=WandbConfig)


# ---------------------------------------------------------------------------------------------- claims
CLAIM_KINDS = ("superiority", "non_inferiority")


@dataclass
class ClaimConfig:
    """A paper's claim as data, judged by ``moe-lora report`` (``moe_lora/report/claims.py``) over
    the runs' seeds, paired by seed. It sits in the train schema so that Hydra types it and every
    ``results.json`` carries the claims of its preset.

    ``arm`` and ``than`` are report labels (a run's ``label``, else ``adapter`` or
    ``adapter/layout``: see ``report/collect.py``); ``at`` selects their runs by flattened config
    keys (``{recipe.max_steps: 450}``). ``metric`` is ``metrics.<key>`` (dots reach nested keys),
    ``routing.<stat>`` (mean over adapted modules of the final window) or ``routing.<stat>@<task
    type>``. ``superiority``: ``arm`` is better than ``than`` by more than ``margin``;
    ``non_inferiority``: ``arm`` is worse by less than ``margin`` ("without hurting accuracy").
    ``arm_at`` / ``than_at`` add selections for one arm only ("forgetting grows from 150 to 450
    steps": one label at two step counts). ``differs_in``: the settings (keys or prefixes, e.g.
    ``adapter.lbc_beta``, ``layout``) the arms are meant to differ in; any other setting two runs of
    a seed pair differ in is warned about; ``params`` declares that the arms' trainable parameters
    differ (else more than 1% is warned about). ``family``: claims sharing it are one intersection-union
    claim ("beats all five"), held only if every member is. ``effect``: the smallest true difference of
    interest (oriented: > 0 favours ``arm``), for the seeds-for-80%-power figure only.
    """

    name: str = MISSING
    metric: str = MISSING
    arm: str = MISSING
    than: str = MISSING
    better: str = "higher"
    at: Dict[str, Any] = field(default_factory=dict)
    kind: str = "superiority"
    margin: float = 0.0
    arm_at: Dict[str, Any] = field(default_factory=dict)
    than_at: Dict[str, Any] = field(default_factory=dict)
    differs_in: List[str] = field(default_factory=list)
    family: Optional[str] = None
    effect: Optional[float] = None

    def __post_init__(self) -> None:
        why = f"(claim {self.name!r})"
        if self.effect is not None:
            require(math.isfinite(self.effect), "claims[].effect", self.effect, f"must be a finite number {why}")
        require(math.isfinite(self.margin), "claims[].margin", self.margin, f"must be a finite number {why}")
        require(bool(self.name), "claims[].name", self.name, "must be a non-empty string")
        require(
            self.metric.split(".", 1)[0] in ("metrics", "routing") and "." in self.metric,
            "claims[].metric",
            self.metric,
            f"must be metrics.<key>, routing.<stat> or routing.<stat>@<task type> {why}",
        )
        require(self.better in ("higher", "lower"), "claims[].better", self.better, f"must be higher or lower {why}")
        require(self.kind in CLAIM_KINDS, "claims[].kind", self.kind, f"must be superiority or non_inferiority {why}")
        require(self.margin >= 0, "claims[].margin", self.margin, f"must be >= 0 {why}")
        require(
            self.arm != self.than or dict(self.arm_at) != dict(self.than_at),
            "claims[].than",
            self.than,
            f"must differ from claims[].arm, or arm_at from than_at {why}",
        )


# ------------------------------------------------------------------------------------------------ root
@dataclass
class TrainConfig:
    """The root config: four composed groups (model, adapter + layout, data, recipe) plus logging."""

    model: ModelConfig = MISSING
    adapter: Any = MISSING  # typed by the chosen variant's schema (see adapters/registry)
    layout: LayoutConfig = MISSING
    data: DataConfig = MISSING
    recipe: RecipeConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    seed: int = 0
    label: Optional[str] = None  # the report row this run belongs to (default: adapter + layout)
    cache_dir: str = "outputs/cache"
    run_dir: Optional[str] = None  # only for `moe-lora eval`
    # continue a run from its newest checkpoint: its directory (= hydra.run.dir), or auto (this
    # job's own directory if it has a checkpoint, else a fresh start: sweeps and requeued jobs)
    resume: Optional[str] = None
    claims: List[ClaimConfig] = field(default_factory=list)  # judged by `moe-lora report`

    def __post_init__(self) -> None:
        check_seed("seed", self.seed)
        check_finite(self)  # the groups check their own; this catches any float a schema adds later


def store_schemas() -> None:
    """Register the group schemas (idempotent: ConfigStore overwrites by name)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, node in (
        ("model", ModelConfig),
        ("layout", LayoutConfig),
        ("data", DataConfig),
        ("recipe", RecipeConfig),
        ("eval", EvalConfig),
        ("logger", LoggerConfig),
        ("source", SourceConfig),
    ):
        cs.store(group=f"schema/{group}", name="base", node=node)


def share_the_config_store() -> None:
    """Make a deep copy of Hydra's ConfigStore the store itself. Hydra 1.3 deep-copies its config
    repository on every composition and every group listing (``CachingConfigRepository``), and the
    repository holds the ConfigStore singleton with every schema registered here: 0.07-0.14 s a
    compose, 10 s of ``moe-lora train --help`` (152 listings), most of a config test's time. The
    store deep-copies each node it hands out (``ConfigStore.load``), so one shared store changes no
    composed config; Hydra's main branch stopped keeping a copy for this reason (facebookresearch/
    hydra pull request 2928, "Use latest configstore singleton instead of storing it")."""
    ConfigStore.__deepcopy__ = lambda self, memo: self  # type: ignore[attr-defined]


store_schemas()
share_the_config_store()


def resolved_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain containers (config.yaml, results.json, the checkpoint's config hash)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))
