"""lm-evaluation-harness on the in-memory (adapted) model; ``lm_eval`` is the optional ``.[eval]`` extra.

The adapted model is handed to ``HFLM`` as an object, so nothing is downloaded, saved or merged:
HFLM then takes the model's own device and dtype (bfloat16 stays bfloat16) and only calls
``eval()`` and ``tie_weights()`` on it. ``simple_evaluate`` seeds python, numpy and torch for
reproducible few-shot sampling; we restore the caller's random state afterwards so that asking for
harness tasks does not change the rest of the run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import random
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, ContextManager

import numpy as np
import torch

from moe_lora.config import HarnessConfig
from moe_lora.errors import ConfigError
from moe_lora.model.structure import is_encoder_decoder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EXTRA = 'pip install -e ".[eval]"'
SUPPORTED = ((0, 4, 10), (0, 5))  # the pin of the extra: lm-eval>=0.4.10,<0.5


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_harness(cfg: HarnessConfig) -> None:
    """Fail before any training when harness tasks are asked for but lm-eval is missing or out of
    the pinned range. Task names are not checked here: lm-eval's task index takes seconds to
    build; an unknown name fails in ``run_harness`` with lm-eval's own message."""
    if not cfg.tasks:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            f"eval.harness.tasks={list(cfg.tasks)} needs lm-evaluation-harness, which is not "
            f"installed; install the extra with {EXTRA}"
        )
    with contextlib.suppress(PackageNotFoundError):  # an unpackaged checkout: trust it
        found = _release(version("lm_eval"))
        if not SUPPORTED[0] <= found < SUPPORTED[1]:
            raise ConfigError(
                f"eval.harness.tasks={list(cfg.tasks)} needs lm-eval>=0.4.10,<0.5 but "
                f"{version('lm_eval')} is installed; reinstall the extra with {EXTRA}"
            )


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """Restore python, numpy and torch (CPU and CUDA) random state on exit."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def task_manager(cfg: HarnessConfig) -> Any:
    """A TaskManager over ``include_path``; lm-eval's ~15k built-in tasks are indexed (slow) only
    when a requested name is not a task of ``include_path`` itself."""
    from lm_eval.tasks import TaskManager

    if not cfg.include_path:
        return TaskManager()
    local = TaskManager(include_path=cfg.include_path, include_defaults=False)
    if all(t in local.all_subtasks for t in cfg.tasks):
        return local
    return TaskManager(include_path=cfg.include_path)


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """``{task: {metric: value}}`` from lm-eval's ``results``: ``acc,none`` becomes ``acc`` (a
    filtered metric keeps lm-eval's ``metric,filter`` name), ``_stderr`` entries are kept, ``alias``
    and other text dropped; NaN and lm-eval's "N/A" stderr become None (JSON has no NaN)."""
    out: dict[str, dict[str, float | None]] = {}
    for task, row in results.items():
        metrics: dict[str, float | None] = {}
        for key, value in row.items():
            if key == "alias" or "," not in key:
                continue
            name = key.removesuffix(",none")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[name] = float(value) if math.isfinite(value) else None
            elif value == "N/A":
                metrics[name] = None
        out[task] = metrics
    return out


def run_harness(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    cfg: HarnessConfig,
    *,
    device: torch.device | str,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> dict[str, dict[str, float | None]]:
    """``lm_eval.simple_evaluate`` on the in-memory model; returns ``{task: {metric: value}}``
    (groups such as ``mmlu`` and their sub-tasks each get a row). ``limit`` below 1 is a fraction
    of each task, as in lm-eval. The model's training mode is restored afterwards."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    limit = cfg.limit if cfg.limit is None or cfg.limit < 1 else int(cfg.limit)
    try:
        with kept_random_state(), autocast():
            # an encoder-decoder (T5) gets lm-eval's seq2seq backend: the context is the encoder's input,
            # each continuation is scored by the decoder (one prompt per task, unlike T0's templates)
            backend = "seq2seq" if is_encoder_decoder(model) else "causal"
            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size, device=str(device), backend=backend)
            out = simple_evaluate(
                model=lm,
                tasks=list(cfg.tasks),
                limit=limit,
                num_fewshot=cfg.num_fewshot,
                task_manager=task_manager(cfg),
                log_samples=False,
            )
    finally:
        model.train(was_training)
    if out is None:  # only non-zero ranks of a distributed launch get None
        return {}
    return flatten_results(out["results"])
