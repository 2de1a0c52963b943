"""One plain fine-tuning loop, readable top to bottom.

All mutable training state lives in :class:`TrainState` (model, optimiser, schedule, loss scaler,
data order, step, open loss window), so checkpoint/resume (:mod:`moe_lora.train.checkpoint`) saves
and restores one object and a resumed run continues bitwise. The loop is deterministic for a given
seed: data order comes from a seeded generator. Loss values and routing statistics accumulate on the
device and are read at logging steps; besides those, each step reads one small flag tensor (a
non-finite loss or gradient, a preemption signal: all ranks must agree on both before the optimiser
steps). The forward runs under the run's autocast (bf16 / fp16); fp16 scales the loss.

Data parallel (:mod:`moe_lora.train.distributed`): step t's global batch is the one-process batch
of ``batch_size x ranks`` examples, rank r taking positions ``[rB, (r+1)B)``; the data order comes
from the seed and the step alone, so any rank count sees the same global batches. Cross-entropy is
summed and divided by the label tokens of the global batch, so the (averaged) gradient equals the
one-process gradient; the logged loss, aux loss and token rate are global.

Validation (``recipe.val_every`` > 0): every ``val_every`` steps and at the last step, the mean
loss on held-out examples (the mixture's ``validation`` list, the first ``recipe.val_batches``
batches of ``batch_size x ranks``; 0: all) is logged as ``val_loss`` on a line of its own, before
that step's checkpoint (a resumed run validates at the same steps and its log keeps the line).
Eval mode (no dropout, no router jitter), no grad, under the run's autocast, on the unwrapped
model (FSDP's forward stays collective: every rank scores an equal share, never an empty one).
It leaves training untouched: the recorder is never opened (routers record, and aux losses exist,
only inside :meth:`RoutingRecorder.batch`), the global RNG is forked and restored and the data
order's generator is not read, so weights, ``loss`` lines and routing.jsonl are bitwise those of a
run without validation. Data parallel, each rank scores its slice of every global batch and the
(loss, count) sums are all-reduced: the value is that of one process, whatever the rank count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from moe_lora.config import RecipeConfig
from moe_lora.data.collate import IGNORE
from moe_lora.errors import ConfigError
from moe_lora.model.structure import is_encoder_decoder
from moe_lora.routing.recorder import RoutingRecorder
from moe_lora.train import preempt
from moe_lora.train.distributed import Dist, full_tensor, gradient_sync
from moe_lora.train.loss import batch_loss, label_count, loss_sums
from moe_lora.train.precision import Precision, peak_memory_bytes, synchronize
from moe_lora.train.schedule import optimizer_with_schedule


class NonFiniteError(ConfigError):
    """The loss or a gradient went NaN / Inf (``recipe.on_nonfinite=stop``); names step and module."""


class Preempted(Exception):
    """SIGTERM / SIGUSR2 / SIGINT arrived (on any rank): the step finished and a checkpoint was
    written."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {preempt.name(signum)} (signal {signum}) after a checkpoint")
        self.signum = signum


class Batches(Protocol):
    """Tokenised training examples, batched by index (``data.collate.EncodedSet``)."""

    def __len__(self) -> int: ...

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]: ...


@dataclass
class TrainState:
    model: PreTrainedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    scaler: torch.amp.GradScaler | None = None
    step: int = 0
    order: list[int] = field(default_factory=list)
    window: torch.Tensor | None = None  # open loss window: sum of CE, sum of aux, micro-batches, tokens
    nonfinite_skips: int = 0

    def trainer_state(self, dist: Dist) -> dict[str, Any]:
        """Everything but the model and optimizer, for a checkpoint. Every rank calls it: the open
        loss window is summed over ranks (rank 0 resumes with the sum, the others with zeros)."""
        window = dist.all_reduce(self.window.clone()) if self.window is not None else None
        return {
            "step": self.step,
            "order": list(self.order),
            "generator": self.generator.get_state(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "window": window.cpu() if window is not None else None,
            "nonfinite_skips": self.nonfinite_skips,
        }

    def load_trainer_state(self, s: dict[str, Any], dist: Dist, device: torch.device) -> None:
        self.step, self.order, self.nonfinite_skips = s["step"], list(s["order"]), s["nonfinite_skips"]
        self.generator.set_state(s["generator"])
        self.scheduler.load_state_dict(s["scheduler"])
        if self.scaler is not None and s["scaler"]:
            self.scaler.load_state_dict(s["scaler"])
        if s["window"] is not None:
            self.window = s["window"].to(device) * float(dist.is_main)

    def next_indices(self, n: int, size: int) -> list[int]:
        """The next ``n`` example indices of a seeded permutation, reshuffled every epoch."""
        if size == 0:
            raise ValueError("the training set is empty")  # validate() names the keys before this
        while len(self.order) < n:
            self.order += torch.randperm(size, generator=self.generator).tolist()
        idx, self.order = self.order[:n], self.order[n:]
        return idx


def _quiet(*args: Any) -> None:
    return None


@dataclass
class LoopIO:
    """What the loop reports to and asks of the run: metrics rows and routing rows (rank 0's
    tracker), ``checkpoint(state)``, ``stop()`` (a preemption signal number, else 0),
    ``diagnose(batch)`` (where a non-finite loss came from), the ranks, and whether to show a
    progress bar. The defaults train quietly in one process (tests, notebooks)."""

    log: Callable[[dict], None] = _quiet
    log_routing: Callable[[list[dict]], None] = _quiet
    checkpoint: Callable[[TrainState], None] | None = None
    stop: Callable[[], int] = lambda: 0
    diagnose: Callable[[dict[str, torch.Tensor]], str] = lambda batch: "the loss"
    dist: Dist = field(default_factory=Dist)
    progress: bool = False


def init_state(
    model: PreTrainedModel, recipe: RecipeConfig, seed: int, precision: Precision | None = None
) -> TrainState:
    """Optimiser (``recipe.optimizer``) and schedule over the trainable parameters, a seeded data
    order, and fp16's loss scaler."""
    params = [p for p in model.parameters() if p.requires_grad]
    warmup = int(recipe.warmup_ratio * recipe.max_steps)
    opt, sched = optimizer_with_schedule(
        recipe.optimizer, params, recipe.lr, recipe.weight_decay, recipe.scheduler, warmup, recipe.max_steps
    )
    scaler = precision.grad_scaler() if precision is not None else None
    return TrainState(model, opt, sched, torch.Generator().manual_seed(seed), scaler)


@dataclass
class Throughput:
    """Tokens (real, not padding) and wall time since the last logging step, and over the run."""

    device: torch.device
    tokens: int = 0
    total_tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    window_start: float = field(default_factory=time.perf_counter)
    val_s: float = 0.0  # validation's wall time, kept out of training's
    val_runs: int = 0

    def exclude(self, seconds: float) -> None:
        """``seconds`` of validation: out of the token rate and ``train_s``, into ``val_s``."""
        self.start += seconds
        self.window_start += seconds
        self.val_s += seconds
        self.val_runs += 1

    def row(self, step: int, tokens: int) -> dict[str, Any]:
        """``{"step", "tokens_per_s", "peak_mem_bytes"}``: a line of its own in metrics.jsonl, never
        on a loss line (resume compares loss lines byte for byte). ``tokens``: of all ranks; the
        peak memory is this rank's."""
        synchronize(self.device)
        now = time.perf_counter()
        row = {
            "step": step,
            "tokens_per_s": tokens / max(now - self.window_start, 1e-9),
            "peak_mem_bytes": peak_memory_bytes(self.device),
        }
        self.total_tokens += tokens
        self.tokens, self.window_start = 0, now
        return row

    def summary(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.start
        validation = {"val_s": self.val_s, "val_runs": self.val_runs} if self.val_runs else {}
        return {
            "tokens": self.total_tokens,
            "train_s": seconds,
            "tokens_per_s": self.total_tokens / max(seconds, 1e-9),
            "peak_mem_bytes": peak_memory_bytes(self.device),
        } | validation


def _forward_backward(
    state: TrainState,
    batches: Batches,
    recorder: RoutingRecorder,
    recipe: RecipeConfig,
    precision: Precision,
    dist: Dist,
    net: torch.nn.Module,
    forward: Callable,
    scaler: Any,
    speed: Throughput,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's micro-batches, forward and backward: (CE, aux, micro-batches) sums, last batch."""
    device, world, first = precision.device, dist.world_size, dist.rank * recipe.batch_size
    seq2seq, config = is_encoder_decoder(state.model), state.model.config
    sums = torch.zeros(3, device=device)  # this step's CE, aux, micro-batches
    for micro in range(recipe.grad_accum):
        indices = state.next_indices(recipe.batch_size * world, len(batches))[first : first + recipe.batch_size]
        batch = batches.batch(indices)
        speed.tokens += int(batch["attention_mask"].sum())  # counted on the host, before the copy
        if seq2seq:  # the decoder's tokens too, and its routers' mask
            batch["target_mask"] = (batch["labels"] != IGNORE).long()
            speed.tokens += int(batch["target_mask"].sum())
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        kwargs = {}
        if dist.enabled:  # CE summed over this rank's label tokens (sequences) / those of the global batch
            kwargs["num_items"] = dist.all_reduce(label_count(batch["labels"], seq2seq))
            kwargs["num_sequences"] = recipe.batch_size * world
        with gradient_sync(net, micro == recipe.grad_accum - 1):  # DDP reduces at the last micro-batch
            with (
                recorder.batch(batch["attention_mask"], batch["task_type"], batch.get("target_mask")),
                precision.autocast(),
            ):
                ce = batch_loss(
                    forward, config, batch, seq2seq=seq2seq, normalization=recipe.loss_normalization, **kwargs
                )
            aux = recorder.pop_aux_loss()
            aux = aux if aux is not None else ce.new_zeros(())
            # ranks' gradients are averaged: world x CE makes the sum of the ranks' CE sums
            scaler.scale((ce.float() * world + aux.float()) / recipe.grad_accum).backward()
        sums += torch.stack([ce.detach().float(), aux.detach().float(), sums.new_ones(())])
    return sums, batch


def _step_flags(
    state: TrainState, scaler: Any, params: list, sums: torch.Tensor, recipe: RecipeConfig, io: LoopIO
) -> tuple[int, int]:
    """Unscale and clip; (non-finite loss or gradient on any rank, preemption signal): the loop's
    one host read per step."""
    scaler.unscale_(state.optimizer)
    norm = (
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm if recipe.max_grad_norm > 0 else math.inf)
        if params
        else sums.new_zeros(())
    )
    bad = ~torch.isfinite(sums[:2]).all()
    if not scaler.is_enabled():  # fp16's scaler skips steps with inf gradients itself
        bad = bad | ~torch.isfinite(full_tensor(norm))  # FSDP: the norm is a DTensor
    # float flags (a bool tensor would turn every signal number into 1), the maximum over ranks (a
    # sum would add up the ranks' signal numbers); signal numbers are exact in float32
    signal = torch.tensor(float(io.stop()), device=sums.device)
    flags = io.dist.all_max(torch.stack([bad.float(), signal]))
    nonfinite, signum = (int(v) for v in flags.tolist())
    return nonfinite, signum


def _apply_update(state: TrainState, scaler: Any, window: torch.Tensor, sums: torch.Tensor, nonfinite: int) -> None:
    if nonfinite:  # skip: no update, the schedule waits, the step's loss stays out of the log
        state.nonfinite_skips += 1
        scaler.update()
    else:
        window[:3] += sums
        scale = scaler.get_scale() if scaler.is_enabled() else None  # a host read, under fp16 only
        scaler.step(state.optimizer)
        scaler.update()
        if scale is None or scaler.get_scale() >= scale:  # fp16 skips steps with inf/nan gradients:
            state.scheduler.step()  # then the schedule waits too (no warmup lost to skipped steps)
    state.optimizer.zero_grad(set_to_none=True)


def _log_window(
    state: TrainState,
    window: torch.Tensor,
    speed: Throughput,
    recorder: RoutingRecorder,
    io: LoopIO,
    bar: Any,
    postfix: dict[str, str],
) -> None:
    dist = io.dist
    window[3] = speed.tokens
    ce_sum, aux_sum, n, tokens = dist.all_reduce(window).tolist()
    row = {
        "step": state.step,
        "loss": ce_sum * dist.world_size / n if n else None,  # None: every step skipped
        "aux_loss": aux_sum / n if n else None,
        "lr": state.scheduler.get_last_lr()[0],
    }
    io.log(row)
    speed.tokens = 0
    io.log(speed.row(state.step, round(tokens)))
    io.log_routing(recorder.flush(state.step))
    if n:
        postfix |= {"loss": f"{row['loss']:.3f}", "aux": f"{row['aux_loss']:.4f}"}
        bar.set_postfix(postfix, refresh=False)
    window.zero_()


def validation_batches(size: int, recipe: RecipeConfig, dist: Dist) -> list[list[int]]:
    """This rank's index lists over ``size`` validation examples: global batches of ``batch_size x
    ranks`` (the first ``recipe.val_batches``; 0: all), rank r taking the r-th equal share of each
    (positions ``[rB, (r+1)B)`` of a full one, as in training). The examples are cut to a multiple
    of the ranks, so every rank runs the same number of non-empty forwards (FSDP's are collective)."""
    width = recipe.batch_size * dist.world_size
    n = size if recipe.val_batches == 0 else min(size, recipe.val_batches * width)
    n -= n % dist.world_size
    out = []
    for start in range(0, n, width):
        share = (min(start + width, n) - start) // dist.world_size
        out.append(list(range(start + dist.rank * share, start + (dist.rank + 1) * share)))
    return out


@torch.no_grad()
def validation_loss(
    model: PreTrainedModel,
    examples: Batches,
    indices: list[list[int]],
    recipe: RecipeConfig,
    precision: Precision,
    dist: Dist,
) -> float | None:
    """Mean loss (``recipe.loss_normalization``: per label token or per sequence) over the batches
    of every rank, in eval mode; the recorder stays closed and the global RNG is restored (module
    docstring). ``None`` when no example has a label."""
    device = precision.device
    seq2seq = is_encoder_decoder(model)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    sums = torch.zeros(2, device=device)  # summed loss, labels (or sequences)
    model.eval()
    try:
        with torch.random.fork_rng(devices=cuda):
            for idx in indices:
                batch = {k: v.to(device, non_blocking=True) for k, v in examples.batch(idx).items()}
                with precision.autocast():
                    sums += loss_sums(
                        model, model.config, batch, seq2seq=seq2seq, normalization=recipe.loss_normalization
                    )
    finally:
        model.train()
    total, count = dist.all_reduce(sums).tolist()
    return total / count if count else None


def _validate(
    state: TrainState,
    examples: Batches,
    indices: list[list[int]],
    recipe: RecipeConfig,
    precision: Precision,
    io: LoopIO,
    speed: Throughput,
    bar: Any,
    postfix: dict[str, str],
) -> None:
    """Log ``{"step", "val_loss"}`` (its own line: deterministic, so a resume keeps it byte for
    byte); its wall time goes to ``val_s``, not to training's token rate."""
    start = time.perf_counter()
    loss = validation_loss(state.model, examples, indices, recipe, precision, io.dist)
    io.log({"step": state.step, "val_loss": loss})
    speed.exclude(time.perf_counter() - start)
    if loss is not None:
        postfix["val"] = f"{loss:.3f}"
        bar.set_postfix(postfix, refresh=False)


def train(
    state: TrainState,
    batches: Batches,
    recorder: RoutingRecorder,
    recipe: RecipeConfig,
    precision: Precision,
    io: LoopIO | None = None,
    hooks: Sequence[Callable[[TrainState], None]] = (),
    net: torch.nn.Module | None = None,
    validation: Batches | None = None,
) -> dict[str, Any]:
    """Train from ``state.step`` until ``recipe.max_steps``; CE + auxiliary routing losses per
    micro-batch. ``hooks`` run after every optimiser step (ALoRA's rank reallocation). ``net`` is
    the module the forward calls (DDP / FSDP-wrapped ``state.model``). ``validation``: held-out
    examples scored every ``recipe.val_every`` steps (needed when it is > 0). ``io.checkpoint`` is called
    every ``recipe.save_every`` steps, at the end, and when ``io.stop()`` returns a signal number
    (then :class:`Preempted` is raised). Non-finite losses or gradients stop the run naming the
    step and ``io.diagnose(batch)``'s module, or skip the step (``recipe.on_nonfinite``). Returns
    throughput and memory."""
    io = io or LoopIO()
    dist = io.dist
    model = state.model
    net = net or model
    forward = torch.compile(net) if recipe.compile else net  # opt-in; same parameters
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = state.scaler or torch.amp.GradScaler(precision.device.type, enabled=False)
    if precision.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(precision.device)
    model.train()
    if state.window is None:
        state.window = torch.zeros(4, device=precision.device)  # tokens: a host count, added at logging
    val_indices = validation_batches(len(validation), recipe, dist) if validation is not None else []
    if recipe.val_every and not val_indices:
        raise ConfigError(
            f"recipe.val_every={recipe.val_every}: no validation examples to score "
            f"({len(validation) if validation is not None else 0} for {dist.world_size} ranks); set recipe.val_every=0"
        )
    speed = Throughput(precision.device)
    postfix: dict[str, str] = {}
    bar = tqdm(total=recipe.max_steps, initial=state.step, desc="fine-tune", disable=not io.progress, mininterval=1.0)
    while state.step < recipe.max_steps:
        sums, batch = _forward_backward(state, batches, recorder, recipe, precision, dist, net, forward, scaler, speed)
        nonfinite, signal = _step_flags(state, scaler, params, sums, recipe, io)
        if nonfinite and recipe.on_nonfinite == "stop":
            where = io.diagnose(batch)
            raise NonFiniteError(
                f"step {state.step + 1}: non-finite loss or gradient, first at {where} "
                "(recipe.on_nonfinite=stop; skip would skip such steps)"
            )
        _apply_update(state, scaler, state.window, sums, nonfinite)
        state.step += 1
        for hook in hooks:
            hook(state)
            model.train()
        bar.update(1)
        if state.step % recipe.log_every == 0 or state.step == recipe.max_steps:
            _log_window(state, state.window, speed, recorder, io, bar, postfix)
        if recipe.val_every and (state.step % recipe.val_every == 0 or state.step == recipe.max_steps):
            _validate(state, validation, val_indices, recipe, precision, io, speed, bar, postfix)
        save_now = recipe.save_every is not None and state.step % recipe.save_every == 0
        if io.checkpoint is not None and (save_now or signal or state.step == recipe.max_steps):
            io.checkpoint(state)
        if signal:
            bar.close()
            raise Preempted(signal)
    bar.close()
    model.eval()
    return speed.summary()
