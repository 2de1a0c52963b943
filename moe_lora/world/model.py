"""The built-in world's base model: a tiny Llama (or T5) pretrained on the world's text, cached.

The cache entry is keyed by everything that changes its weights (:func:`cache_key`) and written
atomically under a file lock, so concurrent runs pretrain once and never read a half-written model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeForCausalLM, T5Config, T5ForConditionalGeneration

from moe_lora.config import WORLD_MOE_FAMILY, ModelConfig, WorldConfig
from moe_lora.errors import ConfigError
from moe_lora.model.load import attn_implementation
from moe_lora.outputs import atomic_dir
from moe_lora.tracking import cache_writes
from moe_lora.world.generator import MC_WORDS, mc_filler
from moe_lora.world.moe import end_pretraining, is_world_moe, moe_arch, world_moe_config
from moe_lora.world.pretrain import pretrain
from moe_lora.world.tokenizer import word_tokenizer

if TYPE_CHECKING:  # transformers' modelling imports cost seconds: loaded when a model is built
    from transformers import LlamaConfig

    from moe_lora.world.generator import World

CACHE_VERSION = 2  # bump when the world generator or pretraining changes meaning


def world_model_config(cfg: ModelConfig, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )


def cache_key(world: WorldConfig, model: ModelConfig) -> str:
    """Hash of everything that changes the pretrained weights."""
    arch = {
        k: getattr(model, k)
        for k in ("hidden_size", "num_layers", "intermediate_size", "num_heads", "num_kv_heads", "tie_word_embeddings")
    }
    if model.family != "llama":  # the T5 twin (the Llama's key is unchanged, so its cache stays valid)
        arch |= {k: getattr(model, k) for k in ("family", "num_decoder_layers", "feed_forward_proj")}
    if is_world_moe(model):  # the toy MoE: experts, top-k, widths
        arch |= moe_arch(model)
    key = {"v": CACHE_VERSION, "world": asdict(world), "arch": arch, "pretrain": asdict(model.pretrain)}
    numerics = os.environ.get("MOE_LORA_NUMERICS", "native")
    if numerics != "native":  # pinned kernels pretrain other weights (moe_lora.env; native keys unchanged)
        key["numerics"] = numerics
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def world_model(cfg: ModelConfig, world: World, cache_dir: str | Path, progress: bool = True):
    """The pretrained world model and tokenizer, from the cache or pretrained now (then cached).

    A file lock makes parallel sweep jobs wait for one pretraining instead of racing; the cache
    entry appears atomically (written to a temporary folder, then renamed).
    """
    t5 = cfg.family == "t5"
    vocab, corpus = world_t5_text(world) if t5 else (world.vocab, None)
    tok = word_tokenizer(vocab)
    cls = _world_class(cfg)
    root = Path(cache_dir)
    entry = root / f"world-model-{cache_key(world.cfg, cfg)}"
    with cache_writes(entry):
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f"{entry.name}.lock", "w")  # noqa: SIM115 (closed below, outside the write guard)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (entry / "model.safetensors").exists():
            print(f"pretraining the world model (cached afterwards in {entry})", flush=True)
            torch.manual_seed(world.cfg.seed)
            build = world_t5_config if t5 else world_moe_config if is_world_moe(cfg) else world_model_config
            model = cls(build(cfg, len(vocab)))
            start = time.time()
            losses = pretrain(model, tok, corpus or world.pretraining_corpus(), cfg.pretrain, world.cfg.seed, progress)
            if is_world_moe(cfg):
                end_pretraining(model)  # the cached config adds no load-balance loss by itself
            with cache_writes(entry), atomic_dir(entry) as tmp:
                model.save_pretrained(tmp)
                (tmp / "pretrain.json").write_text(json.dumps({"seconds": time.time() - start, "loss": losses}))
    model = cls.from_pretrained(entry, dtype=getattr(torch, cfg.dtype), attn_implementation=attn_implementation(cfg))
    model.eval()
    return model, tok


def _world_class(cfg: ModelConfig):
    if cfg.family not in ("llama", "t5", WORLD_MOE_FAMILY):
        raise ConfigError(
            f"model.family={cfg.family!r} with model.source=world: the built-in models are llama, t5 "
            f"and {WORLD_MOE_FAMILY} (model=tiny_world_moe)"
        )
    if cfg.family == WORLD_MOE_FAMILY:
        return Qwen3MoeForCausalLM
    return T5ForConditionalGeneration if cfg.family == "t5" else LlamaForCausalLM


def world_t5_text(world: World) -> tuple[list[str], list[str]]:
    """The T5 twin's vocabulary and pretraining corpus: the world's, plus the multiple-choice words
    (data=world_t0's templates) in filler lines that teach no task format."""
    vocab = [*world.vocab, *(w for w in MC_WORDS if w not in world.vocab)]
    return vocab, world.pretraining_corpus() + mc_filler(200, world.cfg.seed)


def world_t5_config(cfg: ModelConfig, vocab_size: int):
    """The T5 twin (v1.1 style: gated-GELU FFN, untied head), ids as the world tokenizer's:
    pad 0 (also the decoder start, as in T5), EOS 1."""
    return T5Config(
        vocab_size=vocab_size,
        d_model=cfg.hidden_size,
        d_ff=cfg.intermediate_size,
        d_kv=cfg.head_dim or cfg.hidden_size // cfg.num_heads,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers or cfg.num_layers,
        feed_forward_proj=cfg.feed_forward_proj or "gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
