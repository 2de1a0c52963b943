"""Which questions a base model answers right: one greedy answer per calibration question, matched
by a set's rule, decided once and cached (the real facts' known / unknown split, ``data.facts``).

The cache file is keyed by the model's weights (a fingerprint of a few tensors), its tokenizer
(vocabulary and chat template), the questions and every generation setting, so every run of a
sweep reads the same split and a different base model gets its own. It is written atomically
under a file lock: parallel jobs calibrate once. Its records (question, prediction, known) are
the recorded split.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ContextManager

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moe_lora.data.collate import tokenizer_key
from moe_lora.data.example import Example
from moe_lora.eval.metrics import generated_em
from moe_lora.tracking import write_json_atomic

VERSION = 1  # bump when what a calibration file means changes


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the first, middle and last parameter tensors' values (fast, and different for any
    other checkpoint or dtype in practice)."""
    params = list(model.parameters())
    digest = hashlib.sha256(str(model.dtype if hasattr(model, "dtype") else "").encode())
    for p in (params[0], params[len(params) // 2], params[-1]):
        flat = p.detach().flatten()
        digest.update(f"{tuple(p.shape)}:{flat.double().sum().item():.12e}:{flat[:64].double().tolist()}".encode())
    return digest.hexdigest()


def calibration_key(model, tok, examples: Sequence[Example], settings: dict[str, Any]) -> str:
    blob = json.dumps(
        {
            "v": VERSION,
            "model": model_fingerprint(model),
            "tokenizer": tokenizer_key(tok),
            "questions": [(e.id, e.prompt, list(e.aliases) or [e.answer]) for e in examples],
            "settings": settings,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def calibrate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    cache_dir: str | Path,
    name: str,
    match: str,
    stop: tuple[str, ...],
    max_new_tokens: int,
    batch_size: int,
    chat_template: bool,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    progress: bool = False,
) -> tuple[dict[str, dict[str, Any]], Path]:
    """(example id -> {prompt, prediction, known}, the cache file): from the cache, or generated now."""
    settings = {"match": match, "stop": list(stop), "max_new_tokens": max_new_tokens, "chat_template": chat_template}
    path = Path(cache_dir) / f"{name}-calibration-{calibration_key(model, tok, examples, settings)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return json.loads(path.read_text())["records"], path
        if progress:
            print(f"calibrating the base model on {len(examples)} {name} questions (cached in {path})", flush=True)
        with autocast():
            preds, correct = generated_em(
                model,
                tok,
                examples,
                match=match,
                stop=stop,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                chat_template=chat_template,
                progress=progress,
            )
        records = {
            e.id: {"prompt": e.prompt, "answers": list(e.aliases) or [e.answer], "prediction": p, "known": bool(c)}
            for e, p, c in zip(examples, preds, correct, strict=True)
        }
        write_json_atomic(path, {"settings": settings, "records": records})
    return records, path
