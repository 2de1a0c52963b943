"""Cross-group checks of a composed config, before any weights load or any evaluation starts.

Each error is one line naming the key. The cheap checks (files, device, precision, optional
extras, datasets) come first and import little, so bad input fails in seconds; then the
architecture is read from the checkpoint's config.json and the adapter is injected into it on the
meta device, so target matching and every per-layer shape check run here too.
"""

from __future__ import annotations

import os

from torch import nn
from transformers import AutoTokenizer

from moe_lora.adapters import ADAPTERS
from moe_lora.adapters.inject import inject_adapter
from moe_lora.config import TrainConfig
from moe_lora.errors import ConfigError
from moe_lora.eval.harness import check_harness
from moe_lora.model.gguf import check_gguf_file
from moe_lora.model.layouts import resolve_layout
from moe_lora.model.load import check_attn_implementation, meta_model, model_folder, read_architecture, resolve_hub_path
from moe_lora.model.structure import cross_check_peft, read_structure
from moe_lora.recipes.kinds import ModelChecks, kind_of
from moe_lora.routing.base_router import attach_base_routers
from moe_lora.train.precision import check_precision, resolve_device, resolve_precision
from moe_lora.world.generator import World


def validate(cfg: TrainConfig, check_files: bool = True) -> None:
    """Checks across groups; ``cfg.model``'s architecture fields are replaced by the checkpoint's
    own. ``check_files`` also checks that the model, the datasets and the device are there (off for
    parameter accounting)."""
    spec = ADAPTERS.get(cfg.adapter.name)
    if not isinstance(cfg.adapter, spec.config_cls):
        raise ConfigError(
            f"adapter.name={cfg.adapter.name!r} but conf/adapter uses the schema of "
            f"{type(cfg.adapter).__name__}; start the YAML with '- /schema/adapter/{spec.name}@_here_'"
        )
    kind = kind_of(cfg.data)  # two kinds asked for fail here
    if kind.check is not None:
        kind.check(cfg)
    if cfg.data.chat_template is None:  # null: the model says (an instruction-tuned model's YAML sets it)
        cfg.data.chat_template = cfg.model.chat_template
    check_precision(cfg.recipe.precision, cfg.model.dtype, cfg.adapter.dtype, spec.trains_base)
    check_eval(cfg)
    if check_files:
        if cfg.model.source == "hub":
            resolve_hub_path(cfg.model)  # a missing model fails here, in well under a second
            if cfg.model.gguf_file:
                check_gguf_file(cfg.model, cfg.cache_dir)
        resolve_device(cfg.recipe.device)
        if kind.check_files is not None:
            kind.check_files(cfg)
    cfg.model = read_architecture(cfg.model)
    if kind.check_model is not None:
        trains = spec.wrap is not None or spec.trains_base
        kind.check_model(cfg, ModelChecks(check_files, trains, lambda: base_tokenizer(cfg)))
    if getattr(cfg.adapter, "expert_compute", "dense") == "grouped":
        check_grouped(cfg)
    if spec.wrap is not None:
        resolve_layout(cfg.layout, cfg.adapter, cfg.model.total_layers)
    state = check_targets(cfg, spec.wrap is not None)
    if check_files:
        check_memory(cfg, state)


def check_eval(cfg: TrainConfig) -> None:
    if cfg.eval.harness.tasks:
        if cfg.recipe.strategy == "fsdp":  # lm-eval runs on rank 0 only; an FSDP forward needs every rank
            raise ConfigError(
                "eval.harness.tasks with recipe.strategy=fsdp is not supported: use ddp, or run "
                "`moe-lora eval` on the saved adapter"
            )

        check_harness(cfg.eval.harness)


def base_tokenizer(cfg: TrainConfig):
    """The base model's tokenizer, for the data kinds' checks that count tokens."""
    folder = model_folder(cfg.model, cfg.cache_dir)  # a GGUF file: its dequantized copy (made once)
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)


def base_meta_model(cfg: TrainConfig) -> nn.Module:
    """The base architecture on the meta device (the world's vocabulary for the built-in model)."""
    vocab = len(World(cfg.data.world).vocab) if cfg.model.source == "world" else None
    return meta_model(cfg.model, vocab)


def check_targets(cfg: TrainConfig, inject: bool = True) -> int:
    """Build the architecture on the meta device: an attention implementation it refuses fails
    here, and injecting the adapter into it surfaces every target, layout and shape error (a role
    the family lacks, a module list that misses layers, a head size that does not divide, MELoRA's
    minis). Sweep jobs that differ only in other keys (seeds, learning rates) are checked once.
    Returns :func:`adapter_state_bytes` of the injected adapter."""
    key = repr((cfg.model, cfg.adapter, cfg.layout, cfg.data.world if cfg.model.source == "world" else None))
    if key not in _CHECKED_TARGETS:
        model = base_meta_model(cfg)
        check_attn_implementation(model, cfg.model)
        structure = read_structure(model, cfg.model.modules)
        names = inject_adapter(model, cfg.adapter, cfg.model, cfg.layout) if inject else []
        if inject:  # model.moe on the base's routers (null experts, training): its one-line errors, before any run
            attach_base_routers(model, cfg.model.moe, None, structure.moe)
        if cfg.model.source == "hub":  # after the fast checks: importing peft's tables takes seconds
            cross_check_peft(structure)
        _CHECKED_TARGETS[key] = adapter_state_bytes(model, names)
    return _CHECKED_TARGETS[key]


_CHECKED_TARGETS: dict[str, int] = {}


def adapter_state_bytes(model: nn.Module, names: list[str]) -> int:
    """Bytes the adapted modules hold during training, from their meta-device tensors: every
    trainable tensor four times (weights, gradients, AdamW's two moments) plus their buffers (a
    routed layer's ``gate_expand`` is E x E*r: it grows with the square of the experts)."""
    total = 0
    for name in names:
        module = model.get_submodule(name)
        total += sum(4 * p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
        total += sum(b.numel() * b.element_size() for b in module.buffers())
    return total


def machine_memory() -> int | None:
    """Physical memory of this machine in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(cfg: TrainConfig, state: int) -> None:
    """An adapter that cannot fit in this machine's memory (``adapter.num_experts=100000``) fails
    here, in one line, rather than by the kernel's OOM killer once the run folder exists. The
    bound is the host's physical memory: a sanity bound, not a promise that a smaller adapter fits
    (activations and the base model come on top; a GPU has less)."""
    memory = machine_memory()
    if memory is None or state <= memory:
        return
    gib = 2**30
    if cfg.layout.experts is not None:
        key, value = "layout.experts", cfg.layout.experts
    elif hasattr(cfg.adapter, "num_experts"):
        key, value = "adapter.num_experts", cfg.adapter.num_experts
    else:
        key, value = "adapter.rank", getattr(cfg.adapter, "rank", None)
    raise ConfigError(
        f"{key}={value} makes an adapter needing about {state / gib:,.1f} GiB (weights, gradients, "
        f"optimizer state and buffers of adapter={cfg.adapter.name}), more than this machine's "
        f"{memory / gib:,.1f} GiB of memory: lower it"
    )


def check_grouped(cfg: TrainConfig) -> None:
    """Grouped GEMMs need 16-byte rows in their compute dtype (the autocast dtype under bf16/fp16),
    and compiled they exist in bfloat16 only (torch 2.13)."""
    mode = resolve_precision(cfg.recipe.precision, cfg.model.dtype)
    width = 2 if mode in ("bf16", "fp16") or cfg.adapter.dtype != "float32" else 4
    ranks = {p.rank for p in resolve_layout(cfg.layout, cfg.adapter, cfg.model.num_layers)}  # per-layer ranks too
    for rank in sorted(ranks):
        if rank * width % 16:
            key = "layout.rank" if cfg.layout.rank is not None else "adapter.rank"
            raise ConfigError(
                f"{key}={rank} with adapter.expert_compute=grouped must be a multiple of {16 // width} "
                f"when computing in {'16-bit' if width == 2 else 'float32'} (16-byte rows); "
                "use expert_compute=dense"
            )
    if mode != "bf16" and _on_cuda(cfg.recipe.device):
        raise ConfigError(
            f"adapter.expert_compute=grouped on CUDA needs bfloat16 compute (torch's grouped GEMM "
            f"kernel; recipe.precision={cfg.recipe.precision}, model.dtype={cfg.model.dtype}): set "
            "recipe.precision=bf16, or use expert_compute=dense"
        )
    if cfg.recipe.compile and mode != "bf16":
        raise ConfigError(
            f"adapter.expert_compute=grouped with recipe.compile=true needs bfloat16 compute "
            f"(recipe.precision=bf16 or model.dtype=bfloat16; compiled grouped GEMMs are bfloat16 only; "
            f"model.dtype={cfg.model.dtype}, recipe.precision={cfg.recipe.precision})"
        )


def _on_cuda(device: str) -> bool:
    try:
        return resolve_device(device).type == "cuda"
    except ConfigError:  # a missing device is reported by validate() itself (when files are checked)
        return False
