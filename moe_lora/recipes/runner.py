"""The runner: config -> base model -> adapters -> data -> training -> evaluation -> results.

``run`` is called by the CLI inside a Hydra job with a validated :class:`TrainConfig` and a fresh
run directory. Results are written atomically, so a crashed run never leaves a ``results.json``.
Data parallel, every rank runs it with the same config and directory; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from moe_lora import outputs
from moe_lora.adapters import ADAPTERS
from moe_lora.adapters.base import HookContext
from moe_lora.adapters.inject import budget_summary, count_parameters, inject_adapter, plan_targets, targets_table
from moe_lora.config import TrainConfig, resolved_config
from moe_lora.data.collate import collate, encode_examples
from moe_lora.data.example import Mixture
from moe_lora.errors import ConfigError
from moe_lora.eval.evaluate import evaluate
from moe_lora.eval.harness import run_harness
from moe_lora.model.layouts import resolve_layout
from moe_lora.model.load import hub_model
from moe_lora.model.structure import is_encoder_decoder, read_structure
from moe_lora.model.targets import format_targets
from moe_lora.recipes.kinds import DataEnv, kind_of
from moe_lora.recipes.results import build_results, write_adapter, write_predictions
from moe_lora.routing.base_router import attach_base_routers
from moe_lora.routing.recorder import RoutingRecorder
from moe_lora.tracking import Tracker, read_jsonl, write_json_atomic, write_text_atomic
from moe_lora.train import checkpoint as ckpt
from moe_lora.train.checkpoint import adapter_state
from moe_lora.train.distributed import Dist, current, rank_device, wrap_model
from moe_lora.train.loop import LoopIO, TrainState, init_state, train
from moe_lora.train.loss import batch_loss
from moe_lora.train.precision import Precision, make_precision
from moe_lora.train.preempt import preemption
from moe_lora.world.generator import World
from moe_lora.world.model import world_model

ADAPTER_FILE, INIT_ADAPTER_FILE, PREDICTIONS_FILE = outputs.ADAPTER, outputs.INIT_ADAPTER, outputs.PREDICTIONS
log = logging.getLogger(__name__)


def load_base(cfg: TrainConfig, world: World | None, progress: bool = True):
    if cfg.model.source == "world":
        return world_model(cfg.model, world, cfg.cache_dir, progress)
    return hub_model(cfg.model, cfg.cache_dir, progress)


def build_mixture(
    cfg: TrainConfig, world: World | None, model=None, tok=None, precision: Precision | None = None, progress=True
) -> Mixture:
    """The mixture of the config's data kind (``moe_lora.recipes.kinds``)."""
    return kind_of(cfg.data).build(cfg, DataEnv(world, model, tok, precision, progress))


def setup(cfg: TrainConfig, progress: bool = True, dist: Dist | None = None):
    """Seeded world, base model (on its device) and mixture (shared by `train` and `eval`). Data
    parallel, rank 0 goes first: it fills the caches (pretrained world model) the others read."""
    dist = dist or Dist()
    torch.set_num_threads(cfg.recipe.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    precision = make_precision(rank_device(cfg.recipe.device, dist), cfg.recipe.precision, cfg.model.dtype)
    world = World(cfg.data.world) if cfg.model.source == "world" or kind_of(cfg.data).needs_world else None
    with dist.main_first():
        model, tok = load_base(cfg, world, progress and dist.is_main)
    model.to(precision.device)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    mixture = build_mixture(cfg, world, model, tok, precision, progress and dist.is_main)
    return precision, model, tok, mixture


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of the decoder layers (transformers 5 renamed it)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


@torch.no_grad()
def validation_loss(model: nn.Module, batch: dict[str, torch.Tensor], precision: Precision) -> float:
    """Cross-entropy on a fixed batch in eval mode (dropout off, routers not recorded)."""
    was_training = model.training
    model.eval()
    with precision.autocast():
        loss = batch_loss(model, model.config, batch, seq2seq=is_encoder_decoder(model))
    model.train(was_training)
    return float(loss)


class EvalClock:
    """Seconds and model-input tokens of the evaluations of a run (``perf["eval"]``): every forward
    of the model while it runs counts its ``input_ids`` (padding included; one token per row per
    decoding step of generation), so evaluation's share of the wall time and its throughput sit on
    their own lines beside training's."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.tokens: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str, model: nn.Module) -> Iterator[None]:
        count = [0]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor):
                count[0] += ids.numel()

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            handle.remove()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.tokens[name] = self.tokens.get(name, 0) + count[0]

    def summary(self, wall: float) -> dict[str, Any]:
        seconds, tokens = sum(self.seconds.values()), sum(self.tokens.values())
        return {
            "seconds": dict(self.seconds),
            "tokens": dict(self.tokens),
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "share_of_wall": seconds / wall if wall > 0 else None,
        }


def run_eval(
    model,
    tok,
    mixture: Mixture,
    cfg: TrainConfig,
    precision: Precision,
    progress: bool = False,
    dist: Dist | None = None,
):
    """(metrics, prediction records) of one model on every evaluation set of the mixture; given a
    ``dist``, each rank scores its shard of every set and the records are gathered."""
    return evaluate(
        model,
        tok,
        mixture,
        fast_em=cfg.model.source == "world",
        limit=cfg.recipe.eval_limit,
        max_length=lengths(cfg, model),
        eval_cfg=cfg.eval,
        chat_template=cfg.data.chat_template,
        autocast=precision.autocast,
        progress=progress,
        shard=dist,
    )


def prepare_trainable(model: nn.Module, cfg: TrainConfig, trains_base: bool) -> None:
    """Full fine-tuning keeps float32 master weights (``adapter.dtype``) like HF Trainer under AMP;
    adapters are created in ``adapter.dtype``. Called before the base evaluation, so that the base
    and the tuned model are evaluated with the same storage dtype (the cast is exact)."""
    if trains_base:
        model.to(getattr(torch, cfg.adapter.dtype))


@dataclass
class RunIO:
    """What the training loop writes through: metrics and routing rows (rank 0's tracker), the
    final routing window of every module (results.json), and checkpoints."""

    run_dir: Path
    tracker: Tracker | None
    recorder: RoutingRecorder
    dist: Dist
    digest: str  # the training config's hash, stored in every checkpoint
    keep: int  # recipe.keep_checkpoints
    final_routing: dict[str, dict] = field(default_factory=dict)

    def keep_last(self, rows: list[dict]) -> None:
        for r in rows:
            self.final_routing.setdefault(r["module"], {})[r["task_type"]] = r

    def log(self, row: dict) -> None:
        if self.tracker is not None:
            self.tracker.log(row)

    def log_routing(self, rows: list[dict]) -> None:
        if self.tracker is not None:
            self.tracker.log_routing(rows)
        self.keep_last(rows)

    def checkpoint(self, state: TrainState) -> None:
        trainer = state.trainer_state(self.dist) | {
            "recorder": self.recorder.state_dict(),
            "logs": self.tracker.lengths() if self.tracker is not None else {},
        }
        ckpt.save(self.run_dir, state.step, state.model, state.optimizer, trainer, self.digest, self.keep, self.dist)


def run(
    cfg: TrainConfig, run_dir: Path, progress: bool = True, dist: Dist | None = None, resume: Path | None = None
) -> dict[str, Any] | None:
    """Train, evaluate and write the run's files; the results (``None`` on ranks other than 0).
    ``resume``: a checkpoint folder of this run directory to continue from. Reads top to bottom:
    set up, evaluate the base, add the adapter, fine-tune, evaluate the tuned model, write."""
    start = time.time()
    dist = dist or current()
    main = dist.is_main
    progress = progress and main
    resolved = resolved_config(cfg)
    if main:
        write_text_atomic(run_dir / outputs.CONFIG, OmegaConf.to_yaml(OmegaConf.create(resolved)))
    precision, model, tok, mixture = setup(cfg, progress, dist)
    spec = ADAPTERS.get(cfg.adapter.name)
    prepare_trainable(model, cfg, spec.trains_base)  # before the base evaluation: base and tuned in one dtype
    clock = EvalClock()
    with clock.phase("base", model):
        base, base_predictions = run_eval(model, tok, mixture, cfg, precision, progress, dist)
    recorder, adapted, targets, budget = add_adapter(model, cfg, run_dir, dist)
    params = count_parameters(model)
    if main and resume is not None:  # before the tracker appends: logs end where the checkpoint was taken
        truncate_logs(run_dir, ckpt.read_trainer(resume)["logs"])
    tracker = Tracker(run_dir, cfg.logger, resolved, name=run_dir.name) if main else None
    io = RunIO(run_dir, tracker, recorder, dist, ckpt.config_hash(resolved), cfg.recipe.keep_checkpoints)
    results: dict[str, Any] | None = None
    try:
        if main and resume is not None:  # the windows logged before the checkpoint
            io.keep_last(read_jsonl(run_dir / outputs.ROUTING))
        perf: dict[str, Any] = {}
        if params["trainable"] > 0:
            perf = fine_tune(cfg, model, tok, mixture, precision, recorder, adapted, io, resume, progress)
        with clock.phase("tuned", model):
            tuned, tuned_predictions = evaluate_tuned(cfg, model, tok, mixture, precision, progress, dist)
        adapter = adapter_state(model) if main or ckpt.sharded(model) else None  # collective under FSDP
        if main:
            write_predictions(run_dir / PREDICTIONS_FILE, base_predictions, tuned_predictions)
            write_adapter(run_dir / ADAPTER_FILE, adapter)
            wall = time.time() - start
            results = build_results(cfg, resolved, base, tuned, params, adapted, io.final_routing, wall)
            results |= {
                "perf": perf | {"eval": clock.summary(wall)},
                "targets": targets,
                "budget": budget,
                "nonfinite_skips": perf.get("nonfinite_skips", 0),
                "data": mixture.info,
            }
            if spec.report is not None:
                results["adapter_report"] = spec.report(model)
            write_json_atomic(run_dir / outputs.RESULTS, results)
            final = ckpt.latest(run_dir)
            if final is not None and not cfg.recipe.keep_final_state:  # results.json ends the run
                ckpt.drop_optimizer_state(final)
    finally:
        if tracker is not None:
            tracker.finish(results)
    dist.barrier()  # no rank leaves (and tears the group down) before rank 0 has written
    return results


def add_adapter(model: nn.Module, cfg: TrainConfig, run_dir: Path, dist: Dist):
    """Seeded adapter injection with the routing recorder attached; (recorder, adapted module
    names, targets table with the layout's budget). The targets table is printed and later stored
    in results.json, its ``budget`` in results.json["budget"]."""
    torch.manual_seed(cfg.seed)  # adapter init depends on the run seed only
    recorder = RoutingRecorder(
        reduce=dist.all_reduce if dist.enabled else None, grad_reduce=dist.all_reduce_grad if dist.enabled else None
    )
    planned = plan_targets(model, cfg.adapter, cfg.model) if ADAPTERS.get(cfg.adapter.name).wrap is not None else None
    targets = targets_table(model, cfg.adapter, cfg.model, planned) if planned else {}
    plans = resolve_layout(cfg.layout, cfg.adapter, planned[0].num_layers) if planned else None  # once
    budget = budget_summary(cfg.adapter, cfg.layout, planned, plans) if planned else {}
    if targets and dist.is_main:
        print(format_targets(targets), flush=True)
    moe_blocks = (planned[0] if planned else read_structure(model)).moe  # read before expert adapters wrap them
    adapted = inject_adapter(model, cfg.adapter, cfg.model, cfg.layout, recorder, planned, plans)
    attach_base_routers(model, cfg.model.moe, recorder, moe_blocks)  # the base's routers: watched, trained, nulls
    if cfg.recipe.save_init_adapter and dist.is_main:
        write_adapter(run_dir / INIT_ADAPTER_FILE, adapter_state(model))
    return recorder, adapted, targets, budget


def fine_tune(
    cfg: TrainConfig,
    model: nn.Module,
    tok,
    mixture: Mixture,
    precision: Precision,
    recorder: RoutingRecorder,
    adapted: list[str],
    io: RunIO,
    resume: Path | None,
    progress: bool,
) -> dict[str, Any]:
    """The training loop with everything it needs: wrapped model, optimiser state (restored on a
    resume), the variant's hooks, tokenised batches, preemption; returns perf figures."""
    dist = io.dist
    net = wrap_model(model, cfg.recipe.strategy, dist, precision.device)  # before the optimiser (FSDP)
    state = init_state(model, cfg.recipe, cfg.seed, precision)
    if resume is not None:
        restore(state, recorder, resume, dist, precision.device)
    hooks = variant_hooks(cfg, model, tok, mixture, precision, io)
    with dist.main_first():  # rank 0 fills the tokenisation cache
        batches = training_batches(mixture, tok, cfg, model)
        validation = validation_examples(mixture, tok, cfg, model)
    if batches.truncated and dist.is_main:  # counted, never silent (also results.json["perf"]["truncated"])
        log.warning(
            "%d of %d training examples were cut to %s (%d of them inside the answer)",
            batches.truncated,
            len(batches),
            length_keys(cfg, model),
            batches.answer_cut,
        )
    global_batch = cfg.recipe.batch_size * dist.world_size * cfg.recipe.grad_accum
    if dist.is_main and dist.enabled:
        print(
            f"data parallel: {dist.world_size} ranks ({cfg.recipe.strategy}), global batch "
            f"{global_batch} = recipe.batch_size "
            f"{cfg.recipe.batch_size} x {dist.world_size} ranks x recipe.grad_accum {cfg.recipe.grad_accum}"
        )
    with preemption() as stop:
        loop_io = LoopIO(
            io.log,
            io.log_routing,
            io.checkpoint,
            stop,
            dist=dist,
            progress=progress,
            diagnose=lambda batch: first_nonfinite(model, adapted, batch, precision),
        )
        perf = train(state, batches, recorder, cfg.recipe, precision, loop_io, hooks, net, validation)
    return perf | {
        "nonfinite_skips": state.nonfinite_skips,
        "truncated": batches.truncated,
        "answer_cut": batches.answer_cut,
        "ranks": dist.world_size,
        "strategy": cfg.recipe.strategy if dist.enabled else None,
        "global_batch": global_batch,
    }


def variant_hooks(cfg: TrainConfig, model: nn.Module, tok, mixture: Mixture, precision: Precision, io: RunIO) -> list:
    """The variant's training hooks (ALoRA's rank reallocation), on a fixed validation batch."""
    spec = ADAPTERS.get(cfg.adapter.name)
    if spec.make_hook is None:
        return []
    val = collate(
        mixture.validation[: cfg.recipe.realloc_val_examples],
        tok,
        lengths(cfg, model),
        chat_template=cfg.data.chat_template,
    )
    val = {k: v.to(precision.device) for k, v in val.items()}
    # rank 0's value on every rank: the ranks' decisions (ALoRA's pruning) stay identical
    ctx = HookContext(
        val_loss=lambda: io.dist.broadcast(validation_loss(model, val, precision)), recipe=cfg.recipe, log=io.log
    )
    return [spec.make_hook(model, cfg.adapter, ctx)]


def evaluate_tuned(
    cfg: TrainConfig, model: nn.Module, tok, mixture: Mixture, precision: Precision, progress: bool, dist: Dist
):
    """The tuned model on every evaluation set (plus lm-eval harness tasks on rank 0)."""
    sharded = dist.enabled and cfg.recipe.strategy == "fsdp"
    # FSDP's forward gathers shards collectively: every rank must run every batch (no sharded eval)
    tuned, predictions = run_eval(model, tok, mixture, cfg, precision, progress, None if sharded else dist)
    if cfg.eval.harness.tasks and dist.is_main:
        tuned["harness"] = run_harness(
            model, tok, cfg.eval.harness, device=precision.device, autocast=precision.autocast
        )
    return tuned, predictions


def restore(state: TrainState, recorder: RoutingRecorder, path: Path, dist: Dist, device: torch.device) -> None:
    """Adapter, optimizer, RNG, schedule, data position and open windows from a checkpoint."""
    trainer = ckpt.load(path, state.model, state.optimizer, dist)
    state.load_trainer_state(trainer, dist, device)
    recorder.load_state_dict(trainer["recorder"], device, keep=dist.is_main)
    log.info("resumed from %s (step %d)", path, state.step)


def truncate_logs(run_dir: Path, lengths: dict[str, int]) -> None:
    """Cut ``metrics.jsonl`` / ``routing.jsonl`` back to their length at the checkpoint."""
    for name, n in lengths.items():
        path = run_dir / name
        size = path.stat().st_size if path.exists() else 0
        if size < n:
            raise ConfigError(
                f"{path} is shorter ({size} bytes) than at the checkpoint ({n} bytes): the log was "
                "cut or replaced; it cannot be resumed byte for byte"
            )
        with open(path, "r+b") as f:
            f.truncate(n)


@torch.no_grad()
def first_nonfinite(model: nn.Module, adapted: list[str], batch: dict[str, torch.Tensor], precision: Precision) -> str:
    """The first adapted module whose output is non-finite on ``batch`` (forward in eval mode), else
    the first trainable tensor with a non-finite gradient, else the loss itself."""
    found: list[str] = []

    def check(name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            out = out[0] if isinstance(out, tuple) else out
            if not found and isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
                found.append(f"the output of {name}")

        return hook

    handles = [model.get_submodule(n).register_forward_hook(check(n)) for n in adapted]
    was_training = model.training
    try:
        model.eval()
        with precision.autocast():
            batch_loss(model, model.config, batch, seq2seq=is_encoder_decoder(model))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if found:
        return found[0]
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"the gradient of {name}"
    return "the loss (every adapted output and gradient is finite)"


def lengths(cfg: TrainConfig, model: nn.Module) -> int | tuple[int, int]:
    """``data.max_length``, or (source, target) lengths for an encoder-decoder."""
    return cfg.data.lengths(is_encoder_decoder(model))


def length_keys(cfg: TrainConfig, model: nn.Module) -> str:
    if not is_encoder_decoder(model):
        return f"data.max_length={cfg.data.max_length}"
    source, target = lengths(cfg, model)
    return f"data.max_source_length={source} / data.max_target_length={target}"


def training_batches(mixture: Mixture, tok, cfg: TrainConfig, model: nn.Module):
    """The training examples tokenised once (``datasets.map``), batched by index in the loop."""
    return encode_examples(
        mixture.train,
        tok,
        lengths(cfg, model),
        chat_template=cfg.data.chat_template,
        num_proc=cfg.data.num_proc,
        cache_dir=str(Path(cfg.cache_dir) / "tokenized"),
    )


def validation_examples(mixture: Mixture, tok, cfg: TrainConfig, model: nn.Module):
    """The mixture's held-out validation examples, encoded as training's, for the validation loss
    (``recipe.val_every``); ``None`` when it is off."""
    if not cfg.recipe.val_every:
        return None
    return encode_examples(
        mixture.validation,
        tok,
        lengths(cfg, model),
        chat_template=cfg.data.chat_template,
        cache_dir=str(Path(cfg.cache_dir) / "tokenized"),
    )
