"""The public Python API: a trained run as a ``(model, tokenizer)``, and moe_lora's adapters on a
model you already have (your own loop, HF ``Trainer``, TRL).

``load`` rebuilds exactly what ``moe-lora eval`` evaluates: the run's saved config composed again,
the base model, the adapter injected and its tensors copied in. It reads a run folder or a folder
written by ``moe-lora export --format moe_lora`` (``docs/export-format.md``).

Routing outside moe_lora's loop: the training loop opens the recorder around each micro-batch with
the batch's mask and task types. A model returned by :func:`load` or :func:`add_adapter` carries
forward hooks that do the same around every forward of the whole model (the mask from its
``attention_mask``, the task types from an optional ``task_type`` input, which the hook takes out
of the keyword arguments before the model sees them), so :func:`aux_loss` and
:func:`routing_stats` work after any ``model(**batch)``, ``Trainer`` step or ``generate``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from moe_lora import outputs
from moe_lora.adapters import ADAPTERS
from moe_lora.adapters.inject import inject_adapter
from moe_lora.adapters.merging import merge as fold
from moe_lora.config import TASK_TYPES, ModelConfig
from moe_lora.errors import ConfigError, first_line
from moe_lora.model.structure import read_structure
from moe_lora.recipes.compose import compose, to_config
from moe_lora.recipes.reeval import read_adapter, read_run_config
from moe_lora.recipes.runner import load_base as runner_base
from moe_lora.routing.base_router import attach_base_routers
from moe_lora.routing.recorder import RoutingRecorder
from moe_lora.train.checkpoint import set_adapter
from moe_lora.world.generator import World

EXPORT_CONFIG = "adapter_config.json"  # an export folder's description (moe_lora and peft formats)
FORMAT = "moe_lora"  # adapter_config.json["format"] of a moe_lora export
DEFAULT_TASK = "instruction"  # the task type of a batch without a task_type input (LoRAMoE's LBC groups)


@dataclass
class Saved:
    """A finished run or a moe_lora export: its folder, validated config and adapter tensors."""

    folder: Path
    cfg: Any  # TrainConfig
    state: dict[str, torch.Tensor]
    exported: bool  # a moe_lora export folder rather than a run folder
    meta: dict[str, Any] = field(default_factory=dict)  # an export's adapter_config.json


def read_export_config(folder: Path) -> dict[str, Any]:
    """A moe_lora export's ``adapter_config.json``; a peft adapter or a foreign file is one line."""
    path = folder / EXPORT_CONFIG
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read ({first_line(exc, 160)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        kind = "a peft adapter" if isinstance(meta, dict) and "peft_type" in meta else "not a moe_lora export"
        hint = ": load it with peft's PeftModel.from_pretrained" if "peft" in kind else ""
        raise ConfigError(f"{path} is {kind} (no format={FORMAT!r} with a config){hint}")
    return meta


def read_saved(folder: str | Path, overrides: list[str] | None = None) -> Saved:
    """The config and adapter of a run folder or a moe_lora export, read before any model loads,
    so that a folder without a finished adapter fails in one line naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a directory (a moe-lora run folder or a moe_lora export)")
    exported = (folder / EXPORT_CONFIG).is_file() and not (folder / outputs.CONFIG).is_file()
    meta: dict[str, Any] = {}
    if exported:
        meta = read_export_config(folder)
        saved = OmegaConf.create(meta["config"])
    elif (folder / "config.json").is_file() and not (folder / outputs.CONFIG).is_file():
        raise ConfigError(
            f"{folder} is a transformers checkpoint (config.json), not a moe-lora run: "
            "load it with AutoModelForCausalLM.from_pretrained"
        )
    else:
        if not (folder / outputs.CONFIG).is_file():
            raise ConfigError(f"{folder} has no {outputs.CONFIG}: not a moe-lora run folder or moe_lora export")
        saved = read_run_config(folder / outputs.CONFIG)
    if not (folder / outputs.ADAPTER).is_file():
        raise ConfigError(
            f"{folder} has no {outputs.ADAPTER}: the run has not finished (training writes it at the end)"
        )
    state = read_adapter(folder / outputs.ADAPTER)
    dcfg = compose([f"adapter={saved.adapter.name}"])
    cfg = to_config(OmegaConf.merge(dcfg, saved, OmegaConf.from_dotlist(overrides or [])), check_files=False)
    return Saved(folder, cfg, state, exported, meta)


def load_base(cfg: Any, progress: bool = False):
    """The run's base model and tokenizer: the cached world model, or a hub model that must be on
    disk or in the local cache (else one line naming ``model.name_or_path``)."""
    world = None
    if cfg.model.source == "world":
        world = World(cfg.data.world)
    return runner_base(cfg, world, progress)


def build(saved: Saved, device: str | torch.device = "cpu", progress: bool = False):
    """(model, tokenizer, recorder): the base with the saved adapter, in eval mode, on ``device``."""
    cfg = saved.cfg
    model, tok = load_base(cfg, progress)
    model.to(device)
    if ADAPTERS.get(cfg.adapter.name).trains_base:  # full fine-tuning trained (and saved) in adapter.dtype
        model.to(getattr(torch, cfg.adapter.dtype))
    recorder = RoutingRecorder()  # every adapter tensor is then overwritten: no seed needed (nor set)
    blocks = read_structure(model).moe  # before an expert adapter wraps the experts
    adapted = inject_adapter(model, cfg.adapter, cfg.model, cfg.layout, recorder)
    attach_base_routers(model, cfg.model.moe, recorder, blocks)  # the trained base router / null experts
    set_adapter(model, saved.state, saved.folder / outputs.ADAPTER)
    model.eval()
    attach(model, recorder, adapted, cfg.adapter.name)
    return model, tok, recorder


def load(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    overrides: list[str] | None = None,
):
    """``(model, tokenizer)`` of a finished run (or a moe_lora export): the base from the run's
    config, the adapter injected and loaded, eval mode. ``dtype``: the base weights' dtype
    (``model.dtype`` of the run by default; adapters stay in ``adapter.dtype``); ``overrides``:
    config keys as on the command line (``cache_dir=...``)."""
    extra = list(overrides or [])
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        extra.append(f"model.dtype={name}")
    model, tok, _ = build(read_saved(run_dir, extra), device)
    return model, tok


# ------------------------------------------------------------------------ adapters on your model
def adapter_config(variant: str, layout: str | None = None, **overrides: Any):
    """(adapter config, layout config) of ``variant`` as ``conf/adapter/<variant>.yaml`` sets it,
    with ``overrides`` (``rank=8``, ``num_experts=4``, ``target_modules=["ffn"]``) validated."""
    groups = [f"adapter={variant}"] + ([f"layout={layout}"] if layout else [])
    dcfg = OmegaConf.merge(compose(groups), {"adapter": overrides})
    cfg = to_config(dcfg, check_files=False)
    return cfg.adapter, cfg.layout


def add_adapter(
    model: nn.Module, variant: str = "loramoe", *, layout: str | None = None, **overrides: Any
) -> nn.Module:
    """Inject moe_lora's ``variant`` into ``model`` in place (base frozen, adapters trainable) and
    return it, ready for your own loop, HF ``Trainer`` or TRL; add :func:`aux_loss` to the loss.
    ``overrides`` are ``adapter.*`` keys (``rank=8``); ``layout``: a ``conf/layout`` name."""
    if hasattr(model, "_moe_lora"):
        raise ConfigError("the model already has a moe_lora adapter (one per model)")
    adapter, layout_cfg = adapter_config(variant, layout, **overrides)
    recorder = RoutingRecorder()
    path = str(getattr(model, "name_or_path", "") or "in-memory")  # only its module names are read
    model_cfg = ModelConfig(name="user", source="hub", name_or_path=path)
    attach(model, recorder, inject_adapter(model, adapter, model_cfg, layout_cfg, recorder), adapter.name)
    return model


class Attached:
    """The hooks that record routing around every forward of the whole model."""

    def __init__(self, recorder: Any, adapted: list[str], variant: str) -> None:
        self.recorder = recorder
        self.adapted = adapted  # the adapted module names
        self.variant = variant
        self.open: Any = None  # the recorder's batch context of the forward running now
        self.last: torch.Tensor | None = None  # the summed aux loss of the last forward
        self.handles: list = []

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        task = kwargs.pop("task_type", None)
        if self.recorder.active or not self.recorder.routers:  # inside moe_lora's loop, or nothing routed
            return args, kwargs
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return args, kwargs
        shape = tuple(ids.shape[:2])
        mask = _mask(kwargs.get("attention_mask"), shape, ids.device)
        target = kwargs.get("decoder_input_ids", kwargs.get("labels"))
        target_mask = None
        if getattr(module.config, "is_encoder_decoder", False) and target is not None:
            target_mask = _mask(kwargs.get("decoder_attention_mask"), tuple(target.shape[:2]), ids.device)
        self.open = self.recorder.batch(mask, _task_ids(task, shape[0], ids.device), target_mask)
        self.open.__enter__()
        self.recorder.pop_aux_loss()
        return args, kwargs

    def after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.open is None:
            return
        ctx, self.open = self.open, None
        ctx.__exit__(None, None, None)
        self.last = self.recorder.pop_aux_loss()


def _mask(mask: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The real-token mask of this forward's tokens: with a KV cache the attention mask also
    covers the cached positions, so its last ``S`` columns are this forward's."""
    if mask is None or mask.dim() != 2:
        return torch.ones(shape, dtype=torch.long, device=device)
    return mask[:, -shape[1] :]


def _task_ids(task: Any, batch: int, device: torch.device) -> torch.Tensor:
    """Task-type ids (``TASK_TYPES`` indices) from a ``task_type`` input: ids, names, or None."""
    if task is None:
        return torch.full((batch,), TASK_TYPES.index(DEFAULT_TASK), dtype=torch.long, device=device)
    if isinstance(task, (list, tuple)) and task and isinstance(task[0], str):
        unknown = sorted(set(task) - set(TASK_TYPES))
        if unknown:
            raise ConfigError(f"task_type {unknown} is not one of {', '.join(TASK_TYPES)}")
        task = [TASK_TYPES.index(t) for t in task]
    return torch.as_tensor(task, dtype=torch.long, device=device).reshape(batch)


def attach(model: nn.Module, recorder: Any, adapted: list[str], variant: str) -> Attached:
    """Hook the recorder around the model's forwards (see the module docstring)."""
    hooks = Attached(recorder, adapted, variant)
    hooks.handles = [
        model.register_forward_pre_hook(hooks.before, with_kwargs=True),
        model.register_forward_hook(hooks.after, always_call=True),
    ]
    model._moe_lora = hooks
    return hooks


def _attached(model: nn.Module) -> Attached:
    hooks = getattr(model, "_moe_lora", None)
    if hooks is None:
        raise ConfigError("the model has no moe_lora adapter: use moe_lora.load or moe_lora.add_adapter first")
    return hooks


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The auxiliary losses (LoRAMoE's LBC, load balance, router z-loss, as the variant's config
    switches them on) of the model's last forward, summed and weighted; a zero tensor when the
    variant has none. Differentiable: add it to the loss before ``backward``."""
    hooks = _attached(model)
    if hooks.last is not None:
        return hooks.last
    param = next(model.parameters())
    return torch.zeros((), device=param.device)


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights in place and take the wrappers out (peft's
    ``merge_and_unload``); exact for LoRA, ALoRA, MELoRA and IA3. A routed variant is refused: its
    update depends on the input."""
    hooks = _attached(model)
    fold(model, hooks.variant)
    for handle in hooks.handles:
        handle.remove()
    del model._moe_lora
    return model


def routing_stats(model: nn.Module) -> dict[str, dict[str, dict]]:
    """Routing statistics of every forward since the last call (then reset), per adapted module
    and task type (``all`` too): importance, load, CV, entropy, null rate ... as in
    ``routing.jsonl``; empty for variants without routers."""
    rows = _attached(model).recorder.flush(step=0)
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        out.setdefault(r["module"], {})[r["task_type"]] = {k: v for k, v in r.items() if k not in ("step", "module")}
    return out
