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

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from moe_lora.errors import require

TASK_TYPES = ("cbqa", "instruction")


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
        require(self.steps >= 1, "model.pretrain.steps", self.steps, "must be >= 1")
        require(self.lr > 0, "model.pretrain.lr", self.lr, "must be > 0")


@dataclass
class ModelConfig:
    """A base model. Per-family module names live here and nowhere else.

    ``source=world`` builds the tiny Llama from the architecture fields and pretrains it on the
    built-in world (cached). ``source=hub`` loads ``name_or_path`` with transformers; the
    architecture fields then describe the real model so that parameters can be counted without
    downloading it.
    """

    name: str = MISSING
    source: str = "hub"
    name_or_path: Optional[str] = None
    family: str = "llama"
    modules: Dict[str, List[str]] = field(default_factory=dict)
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 512
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    vocab_size: Optional[int] = None
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    trust_remote_code: bool = False
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        require(self.source in ("world", "hub"), "model.source", self.source, "must be 'world' or 'hub'")
        if self.source == "hub":
            require(bool(self.name_or_path), "model.name_or_path", self.name_or_path, "is required for model.source=hub")
        require(bool(self.modules), "model.modules", self.modules, "must map group names (attention, ffn) to module names")
        require(self.num_layers >= 1, "model.num_layers", self.num_layers, "must be >= 1")
        require(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", self.dtype,
                "must be float32, bfloat16 or float16")


# ------------------------------------------------------------------------------------------ adapters
@dataclass
class AdapterConfig:
    """Fields every adapter has. ``target_modules`` entries are module names or group names of
    ``model.modules`` (``ffn``, ``attention``, ``all``); names match a module path by suffix."""

    name: str = MISSING
    target_modules: List[str] = field(default_factory=lambda: ["ffn"])

    def __post_init__(self) -> None:
        require(len(self.target_modules) > 0, "adapter.target_modules", self.target_modules, "must not be empty")


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
        require(0.0 <= self.dropout < 1.0, "adapter.dropout", self.dropout, "must be in [0, 1)")
        require(self.init_A in ("kaiming", "normal"), "adapter.init_A", self.init_A, "must be 'kaiming' or 'normal'")


@dataclass
class MoEConfig(LowRankConfig):
    """Routed experts. ``top_k=None`` is soft routing over all experts; the loss weights switch the
    shared auxiliary losses of :mod:`moe_lora.routing.losses` on for any variant."""

    num_experts: int = 8
    top_k: Optional[int] = None
    num_null_experts: int = 0
    lb_weight: float = 0.0
    z_loss_weight: float = 0.0
    router_jitter: float = 0.0
    router_fp32: bool = True
    # "dense": every expert on every token, unselected ones gated by zero (fastest for E <= 16 on
    # CPU); "grouped": top-k (token, expert) pairs sorted by expert and computed with grouped GEMMs
    # (``torch._grouped_mm``), E/k times fewer expert FLOPs, for large E*r and GPUs. Same results up
    # to summation order; on CUDA its index_add_ uses atomics, so runs are bitwise reproducible only
    # under torch.use_deterministic_algorithms(True).
    expert_compute: str = "dense"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.num_experts >= 1, "adapter.num_experts", self.num_experts, "must be >= 1")
        require(self.expert_compute in ("dense", "grouped"), "adapter.expert_compute", self.expert_compute,
                "must be 'dense' or 'grouped'")
        if self.expert_compute == "grouped":
            import torch

            require(self.top_k is not None, "adapter.expert_compute", self.expert_compute,
                    "needs top-k routing (set adapter.top_k); soft routing uses every expert")
            require(hasattr(torch, "_grouped_mm"), "adapter.expert_compute", self.expert_compute,
                    f"needs torch._grouped_mm (torch >= 2.8; this is {torch.__version__})")
        if self.top_k is not None:
            require(self.top_k >= 1, "adapter.top_k", self.top_k, "must be >= 1 (or null for soft routing)")
            total = self.num_experts + self.num_null_experts
            require(self.top_k <= total, "adapter.top_k", self.top_k,
                    f"exceeds adapter.num_experts={self.num_experts}"
                    + (f" + adapter.num_null_experts={self.num_null_experts}" if self.num_null_experts else ""))
        require(self.num_null_experts >= 0, "adapter.num_null_experts", self.num_null_experts, "must be >= 0")
        require(self.num_null_experts == 0 or self.top_k is not None, "adapter.num_null_experts",
                self.num_null_experts, "needs top-k routing (set adapter.top_k)")
        for key in ("lb_weight", "z_loss_weight", "router_jitter"):
            require(getattr(self, key) >= 0, f"adapter.{key}", getattr(self, key), "must be >= 0")


# ---------------------------------------------------------------------------------------------- layout
@dataclass
class LayoutConfig:
    """Experts (and optionally rank / top_k) per layer: a list of length L (per layer) or G (per
    group of layers; layer l is in group floor(l * G / L)). ``experts=None`` is uniform."""

    name: str = "uniform"
    experts: Optional[List[int]] = None
    rank: Optional[List[int]] = None
    top_k: Optional[List[int]] = None

    def __post_init__(self) -> None:
        for key in ("experts", "rank", "top_k"):
            values = getattr(self, key)
            if values is not None:
                require(len(values) > 0 and all(v >= 1 for v in values), f"layout.{key}", values,
                        "must be a non-empty list of positive integers")


# ------------------------------------------------------------------------------------------------ data
@dataclass
class WorldConfig:
    """The built-in synthetic world: people, attributes, paraphrased biographies, QA pairs."""

    seed: int = 0
    num_people: int = 200
    bios_per_person: int = 5
    trained_fraction: float = 0.5  # people whose QA pairs appear in pretraining and fine-tuning

    def __post_init__(self) -> None:
        require(self.num_people >= 8, "data.world.num_people", self.num_people, "must be >= 8")
        require(self.bios_per_person >= 1, "data.world.bios_per_person", self.bios_per_person, "must be >= 1")
        require(0.0 < self.trained_fraction < 1.0, "data.world.trained_fraction", self.trained_fraction,
                "must be in (0, 1)")


@dataclass
class DataConfig:
    """The fine-tuning mix: instruction examples plus a ``cbqa_ratio`` share of CBQA pairs about
    trained people; every example carries its task type (``cbqa`` or ``instruction``)."""

    name: str = "world_mix"
    source: str = "world"  # world | hub (TriviaQA / NQ + instruction sets; loaders arrive later)
    hub_datasets: List[str] = field(default_factory=list)  # for source=hub, e.g. [trivia_qa, nq_open]
    world: WorldConfig = field(default_factory=WorldConfig)
    num_train: int = 2000
    cbqa_ratio: float = 0.1
    instruction_tasks: List[str] = field(default_factory=lambda: ["reverse", "sort", "upper"])
    min_items: int = 2  # list length of instruction examples
    max_items: int = 3
    eval_per_task: int = 100
    max_length: int = 64

    def __post_init__(self) -> None:
        require(self.source in ("world", "hub"), "data.source", self.source, "must be 'world' or 'hub'")
        require(self.source == "world" or bool(self.hub_datasets), "data.hub_datasets", self.hub_datasets,
                "must name the datasets for data.source=hub")
        require(0.0 <= self.cbqa_ratio <= 1.0, "data.cbqa_ratio", self.cbqa_ratio, "must be in [0, 1]")
        require(self.num_train >= 1, "data.num_train", self.num_train, "must be >= 1")
        require(self.eval_per_task >= 1, "data.eval_per_task", self.eval_per_task, "must be >= 1")
        require(1 <= self.min_items <= self.max_items <= 10, "data.max_items", self.max_items,
                f"must be in [data.min_items={self.min_items}, 10]")


# ---------------------------------------------------------------------------------------------- recipe
@dataclass
class RecipeConfig:
    """Optimisation: AdamW with a warmup + decay schedule, gradient accumulation, clipping."""

    name: str = "quick"
    max_steps: int = 600
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
    realloc_every: Optional[int] = None  # rank reallocation period (ALoRA); None = max_steps // 4
    realloc_prune: int = 4  # components moved per reallocation
    realloc_val_examples: int = 64  # validation examples that score components
    save_init_adapter: bool = False  # also save the adapter at initialisation (asymmetry analysis)

    def __post_init__(self) -> None:
        require(self.max_steps >= 1, "recipe.max_steps", self.max_steps, "must be >= 1")
        require(self.lr > 0, "recipe.lr", self.lr, "must be > 0")
        require(self.batch_size >= 1, "recipe.batch_size", self.batch_size, "must be >= 1")
        require(self.grad_accum >= 1, "recipe.grad_accum", self.grad_accum, "must be >= 1")
        require(self.scheduler in ("cosine", "linear", "constant", "constant_with_warmup"), "recipe.scheduler",
                self.scheduler, "must be cosine, linear, constant or constant_with_warmup")
        require(0.0 <= self.warmup_ratio < 1.0, "recipe.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        require(self.log_every >= 1, "recipe.log_every", self.log_every, "must be >= 1")
        require(self.eval_limit is None or self.eval_limit >= 1, "recipe.eval_limit", self.eval_limit,
                "must be >= 1 or null")
        require(self.realloc_every is None or self.realloc_every >= 1, "recipe.realloc_every", self.realloc_every,
                "must be >= 1 or null")
        require(self.realloc_prune >= 0, "recipe.realloc_prune", self.realloc_prune, "must be >= 0")


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
        require(self.mode in ("online", "offline", "disabled"), "logger.wandb.mode", self.mode,
                "must be online, offline or disabled")


@dataclass
class LoggerConfig:
    name: str = "jsonl"
    wandb: WandbConfig = field(default_factory=WandbConfig)


# ------------------------------------------------------------------------------------------------ root
@dataclass
class TrainConfig:
    """The root config: four composed groups (model, adapter + layout, data, recipe) plus logging."""

    model: ModelConfig = MISSING
    adapter: Any = MISSING  # typed by the chosen variant's schema (see adapters/registry)
    layout: LayoutConfig = MISSING
    data: DataConfig = MISSING
    recipe: RecipeConfig = MISSING
    logger: LoggerConfig = MISSING
    seed: int = 0
    label: Optional[str] = None  # the report row this run belongs to (default: adapter + layout)
    cache_dir: str = "outputs/cache"
    run_dir: Optional[str] = None  # only for `moe-lora eval`


def store_schemas() -> None:
    """Register the group schemas (idempotent: ConfigStore overwrites by name)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, node in (
        ("model", ModelConfig),
        ("layout", LayoutConfig),
        ("data", DataConfig),
        ("recipe", RecipeConfig),
        ("logger", LoggerConfig),
    ):
        cs.store(group=f"schema/{group}", name="base", node=node)


store_schemas()
