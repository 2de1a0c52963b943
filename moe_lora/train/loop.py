"""One plain fine-tuning loop, readable top to bottom.

All mutable training state lives in :class:`TrainState` (model, optimiser, schedule, data order,
step), so checkpoint/resume can save and restore exactly one object. The loop is deterministic for
a given seed: data order comes from a seeded generator, and the only host syncs happen at logging
steps (loss values and routing statistics are accumulated on the device in between).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moe_lora.config import RecipeConfig
from moe_lora.data.collate import collate
from moe_lora.data.example import Example
from moe_lora.routing.recorder import RoutingRecorder
from moe_lora.train.schedule import adamw_with_schedule


@dataclass
class TrainState:
    model: PreTrainedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    step: int = 0
    order: list[int] = field(default_factory=list)

    def next_indices(self, n: int, size: int) -> list[int]:
        """The next ``n`` example indices of a seeded permutation, reshuffled every epoch."""
        while len(self.order) < n:
            self.order += torch.randperm(size, generator=self.generator).tolist()
        idx, self.order = self.order[:n], self.order[n:]
        return idx


def init_state(model: PreTrainedModel, recipe: RecipeConfig, seed: int) -> TrainState:
    params = [p for p in model.parameters() if p.requires_grad]
    warmup = int(recipe.warmup_ratio * recipe.max_steps)
    opt, sched = adamw_with_schedule(params, recipe.lr, recipe.weight_decay, recipe.scheduler, warmup, recipe.max_steps)
    return TrainState(model, opt, sched, torch.Generator().manual_seed(seed))


def train(
    state: TrainState, tok: PreTrainedTokenizerBase, recorder: RoutingRecorder, examples: Sequence[Example],
    recipe: RecipeConfig, max_length: int, log: Callable[[dict], None], log_routing: Callable[[list[dict]], None],
    progress: bool = True, hooks: Sequence[Callable[[TrainState], None]] = (),
) -> None:
    """Train until ``recipe.max_steps``; CE + auxiliary routing losses per micro-batch. ``hooks``
    run after every optimiser step (ALoRA's rank reallocation)."""
    model = state.model
    forward = torch.compile(model) if recipe.compile else model  # opt-in; same parameters
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    model.train()
    window = torch.zeros(3, device=device)  # sum of CE, sum of aux, micro-batches
    bar = tqdm(total=recipe.max_steps, initial=state.step, desc="fine-tune", disable=not progress, mininterval=1.0)
    while state.step < recipe.max_steps:
        for _ in range(recipe.grad_accum):
            batch = collate([examples[i] for i in state.next_indices(recipe.batch_size, len(examples))], tok, max_length)
            batch = {k: v.to(device) for k, v in batch.items()}
            with recorder.batch(batch["attention_mask"], batch["task_type"]):
                ce = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss
            aux = recorder.pop_aux_loss()
            aux = aux if aux is not None else ce.new_zeros(())
            ((ce + aux) / recipe.grad_accum).backward()
            window += torch.stack([ce.detach(), aux.detach(), ce.new_ones(())])
        if params and recipe.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        for hook in hooks:
            hook(state)
            model.train()
        bar.update(1)
        if state.step % recipe.log_every == 0 or state.step == recipe.max_steps:
            ce_sum, aux_sum, n = window.tolist()
            row = {"step": state.step, "loss": ce_sum / n, "aux_loss": aux_sum / n,
                   "lr": state.scheduler.get_last_lr()[0]}
            log(row)
            log_routing(recorder.flush(state.step))
            bar.set_postfix(loss=f"{row['loss']:.3f}", aux=f"{row['aux_loss']:.4f}", refresh=False)
            window.zero_()
    bar.close()
    model.eval()
