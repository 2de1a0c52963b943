"""Base models: any Hugging Face causal LM or encoder-decoder (a hub id or a local folder), and the
same architectures on the meta device for parameter counts. The built-in world's model is in
:mod:`moe_lora.world.model`.

Downloads are off unless the user sets ``HF_HUB_OFFLINE=0``: the CLI sets the offline variables
before transformers is imported, and local paths are checked here, so a missing model fails in
well under a second with a message that names ``model.name_or_path``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

from moe_lora.config import WORLD_MOE_FAMILY, ModelConfig
from moe_lora.errors import ConfigError, first_line
from moe_lora.model.gguf import default_cache_dir, dequantized_folder, gguf_config, gguf_path, require_gguf

if TYPE_CHECKING:  # transformers' modelling imports cost seconds: loaded when a model is built
    from transformers import PreTrainedModel


def attn_implementation(cfg: ModelConfig) -> str | None:
    """``auto`` is transformers' own choice (None): sdpa where the architecture supports it, else
    eager. An explicit value is checked against the architecture in ``validate``."""
    return None if cfg.attn_implementation == "auto" else cfg.attn_implementation


def check_attn_implementation(model: PreTrainedModel, cfg: ModelConfig) -> None:
    """An explicit ``model.attn_implementation`` the architecture (or this install) refuses fails
    here, on the meta-device model, instead of as a traceback after the weights load."""
    if cfg.attn_implementation == "auto" or not hasattr(model, "get_correct_attn_implementation"):
        return
    try:
        model.get_correct_attn_implementation(cfg.attn_implementation, is_init_check=True)
    except (ValueError, ImportError) as exc:
        reason = str(exc).split(". ")[0].split("\n")[0]
        raise ConfigError(
            f"model.attn_implementation={cfg.attn_implementation!r} cannot be used with "
            f"{type(model).__name__} ({reason}); use auto (the default) or eager"
        ) from None


def is_seq2seq(cfg: ModelConfig, config=None) -> bool:
    """Whether the model is an encoder-decoder: ``model.architecture``, else the checkpoint's
    ``is_encoder_decoder``, else whether transformers knows the family only as seq2seq (t5, mt5, ...)."""
    if cfg.architecture != "auto":
        return cfg.architecture == "seq2seq"
    if config is not None:
        return bool(getattr(config, "is_encoder_decoder", False))

    return (
        cfg.family in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
        and cfg.family not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )


def check_causal(config, cfg: ModelConfig) -> None:
    """A causal LM or an encoder-decoder (seq2seq LM); any other head fails naming the model."""
    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False) and kind in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not cfg.trust_remote_code:
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path!r} is a {kind!r} model, which is not a causal LM "
            "in transformers (AutoModelForCausalLM); moe_lora trains decoder-only causal LMs"
        )


def check_latent_attention(config, cfg: ModelConfig) -> None:
    """Multi-head latent attention (DeepSeek-V2/V3: a ``kv_lora_rank``) expands its compressed keys
    and values to ``num_attention_heads`` heads, and transformers' attention then repeats them
    ``num_attention_heads / num_key_value_heads`` times: a config with fewer key/value heads (a
    tiny checkpoint written with GQA defaults) fails deep in the first forward with a shape
    mismatch. The released checkpoints set both equal; anything else fails here, in one line."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, kv = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    if getattr(text, "kv_lora_rank", None) and heads and kv and kv != heads:
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path!r}: {text.model_type} uses multi-head latent attention "
            f"(kv_lora_rank={text.kv_lora_rank}), which expands keys to num_attention_heads={heads}, but its "
            f"config.json sets num_key_value_heads={kv}: transformers' attention would fail on the first "
            f"forward; set num_key_value_heads={heads} in config.json"
        )


def checkpoint_config(cfg: ModelConfig):
    """The transformers config of a hub model when its ``config.json`` is readable here (a local
    directory, or a hub id in the local Hugging Face cache), else None. Reads one small file; a
    GGUF file's config comes from its metadata."""
    if cfg.source == "hub" and cfg.gguf_file:
        config = gguf_config(cfg)
        if config is not None:
            check_causal(config, cfg)
        return config
    if cfg.source != "hub" or not cfg.name_or_path:
        return None

    path = Path(str(cfg.name_or_path)).expanduser()
    if not (path / "config.json").is_file():
        if _looks_local(str(cfg.name_or_path)) or path.exists():
            return None  # a local path without config.json: not a hub id to look up in the cache

        if not isinstance(try_to_load_from_cache(str(cfg.name_or_path), "config.json"), str):
            return None
        path = cfg.name_or_path
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # OSError, ValueError (not JSON), transformers 5's StrictDataclass*Error, ...
        where = Path(path) / "config.json" if isinstance(path, Path) else "config.json"
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path!r}: {where} cannot be read ({config_reason(exc)})"
        ) from None
    check_causal(config, cfg)
    check_latent_attention(config, cfg)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_reason(exc: BaseException) -> str:
    """One line for a config.json that transformers refuses. Transformers 5 validates fields with
    huggingface_hub's strict dataclasses, whose first line ("Validation error for field
    'hidden_size':") leaves the reason to its cause ("expected int, got str")."""
    head = first_line(exc, 160)
    cause = exc.__cause__
    if cause is not None and head.endswith(":"):
        return f"{head} {first_line(cause, 160)}"
    return head


def _first(config, *keys: str, default=None):
    return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), default)


def read_architecture(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the architecture fields taken from the checkpoint's own config.json.

    The YAML's values are only a fallback for meta-device accounting of models that are not on
    disk: a 2-layer checkpoint under ``model=gpt2`` is a 2-layer GPT-2. A hub model run under the
    built-in model's config (``model.source=hub`` without ``model=...``) is labelled by its folder
    or hub id rather than ``tiny_world``."""
    config = checkpoint_config(cfg)
    if config is None:
        return cfg
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = _first(
        config, "num_key_value_heads", "num_kv_heads", default=1 if getattr(config, "multi_query", False) else heads
    )
    seq2seq = is_seq2seq(cfg, config)
    fields = dict(
        family=config.model_type,
        architecture="seq2seq" if seq2seq else "causal",
        num_decoder_layers=_first(config, "num_decoder_layers", "decoder_layers") if seq2seq else None,
        feed_forward_proj=getattr(config, "feed_forward_proj", None),
        num_layers=config.num_hidden_layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=_first(config, "head_dim", "d_kv") or hidden // heads,
        intermediate_size=_first(
            config, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "d_ff", default=4 * hidden
        ),
        vocab_size=config.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )
    if cfg.gguf_file and cfg.name == "tiny_world":  # model.source=hub model.gguf_file=...: labelled by the file
        fields["name"] = Path(str(cfg.gguf_file)).stem
    elif cfg.name == "tiny_world":
        fields["name"] = Path(str(cfg.name_or_path).rstrip("/")).name or str(cfg.name_or_path)
    return replace(cfg, **fields)


def arch_config(cfg: ModelConfig, vocab_size: int | None = None, **overrides):
    """A transformers config from the architecture fields of ``conf/model/*`` (no download)."""
    vocab = vocab_size or cfg.vocab_size
    if vocab is None:
        raise ConfigError(
            f"model.vocab_size is required to build {cfg.name!r} without its config.json "
            f"(model.name_or_path={cfg.name_or_path!r} is not readable here)"
        )
    fields = {
        **{
            k: getattr(cfg, k)
            for k in ("hidden_size", "num_layers", "intermediate_size", "num_heads", "num_kv_heads", "head_dim")
        },
        **overrides,
    }
    if cfg.family in ("t5", "mt5", "umt5"):
        kw = dict(
            d_model=fields["hidden_size"],
            d_ff=fields["intermediate_size"],
            num_layers=fields["num_layers"],
            num_decoder_layers=cfg.num_decoder_layers or fields["num_layers"],
            num_heads=fields["num_heads"],
            d_kv=fields["head_dim"] or fields["hidden_size"] // fields["num_heads"],
            feed_forward_proj=cfg.feed_forward_proj or "gated-gelu",
            vocab_size=vocab,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
    elif cfg.family == "gpt2":
        kw = dict(
            n_embd=fields["hidden_size"],
            n_layer=fields["num_layers"],
            n_head=fields["num_heads"],
            n_inner=fields["intermediate_size"],
            vocab_size=vocab,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
    else:
        kw = dict(
            hidden_size=fields["hidden_size"],
            num_hidden_layers=fields["num_layers"],
            intermediate_size=fields["intermediate_size"],
            num_attention_heads=fields["num_heads"],
            num_key_value_heads=fields["num_kv_heads"] or fields["num_heads"],
            vocab_size=vocab,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
        if fields["head_dim"] is not None and "hidden_size" not in overrides:
            kw["head_dim"] = fields["head_dim"]
        if cfg.source == "world" and cfg.family == WORLD_MOE_FAMILY:  # the built-in toy MoE (model.moe)
            kw |= cfg.moe.architecture()
    kw |= family_fields(cfg)
    try:
        config = AutoConfig.for_model(cfg.family, **kw)
    except ValueError as exc:
        raise ConfigError(f"model.family={cfg.family!r} is not a transformers model type ({exc})") from None
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # a family default past a smaller vocabulary
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= vocab:
            setattr(config, key, None)
    return config


def family_fields(cfg: ModelConfig) -> dict:
    """``model.config_fields``: the family's own config fields (an MoE's experts, top-k, expert size,
    dense layers), checked against its transformers config class, which would otherwise keep a
    misspelt key as an attribute nobody reads and count a model that does not exist."""
    fields = dict(cfg.config_fields)
    if not fields:
        return fields
    if cfg.family not in CONFIG_MAPPING:
        raise ConfigError(f"model.family={cfg.family!r} is not a transformers model type")
    config_class = CONFIG_MAPPING[cfg.family]
    known = {f.name for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else set()
    known |= set(inspect.signature(config_class.__init__).parameters) | set(config_class.attribute_map)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(
            f"model.config_fields.{unknown[0]} is not a field of transformers' {config_class.__name__} "
            f"(model.family={cfg.family})"
        )
    return fields


def meta_model(cfg: ModelConfig, vocab_size: int | None = None, **overrides) -> PreTrainedModel:
    """The architecture with no allocated weights (meta device): parameter accounting in seconds.

    A readable checkpoint builds from its own config.json (its real parameter count); otherwise the
    YAML's architecture fields are used."""
    config = None if overrides or cfg.source == "world" else checkpoint_config(cfg)
    if config is None:
        config = arch_config(cfg, vocab_size, **overrides)
    auto = AutoModelForSeq2SeqLM if is_seq2seq(cfg, config) else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=cfg.trust_remote_code)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or os.sep + os.sep in path


def resolve_hub_path(cfg: ModelConfig) -> str:
    """A local directory, or a hub id that is in the local cache (or downloads are allowed); for
    ``model.gguf_file``, the GGUF file (and the gguf package there to read it)."""
    if cfg.gguf_file:
        require_gguf()
        return str(gguf_path(cfg))
    path = str(cfg.name_or_path)
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.name_or_path={path!r} is a directory without config.json")
        check_model_folder(local, path)
        return str(local)
    if _looks_local(path) or local.exists():
        raise ConfigError(f"model.name_or_path={path!r}: no such directory")
    offline = os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false", "False")
    if offline and not isinstance(try_to_load_from_cache(path, "config.json"), str):
        raise ConfigError(
            f"model.name_or_path={path!r} is not in the local Hugging Face cache and downloads "
            f"are off; set HF_HUB_OFFLINE=0 to download it, or point to a local directory"
        )
    return path


TOKENIZER_FILES = (  # what AutoTokenizer loads from: a fast tokenizer, its config, or a slow one's vocabulary
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)


def check_model_folder(folder: Path, key: str) -> None:
    """A local model folder has a tokenizer and whole safetensors weights (their headers parse and
    cover each file: no tensor is read), so a folder copied without its tokenizer or cut short fails
    in the precheck, naming the file, before any run folder exists."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"model.name_or_path={key!r}: {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "copy the model's tokenizer files into it"
        )
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt"):
                pass
        except Exception as exc:  # SafetensorError (cut short, bad header), OSError
            raise ConfigError(
                f"model.name_or_path={key!r}: {weights} cannot be read ({first_line(exc, 160)})"
            ) from None


def model_folder(cfg: ModelConfig, cache_dir: str | Path | None = None, progress: bool = True) -> str:
    """The folder (or hub id) transformers loads: ``model.name_or_path``, or for ``model.gguf_file``
    its dequantized copy under ``cache_dir`` (made now on a cache miss)."""
    if cfg.gguf_file:
        return str(dequantized_folder(cfg, cache_dir or default_cache_dir(), progress))
    return resolve_hub_path(cfg)


def hub_model(cfg: ModelConfig, cache_dir: str | Path | None = None, progress: bool = True):
    """Any Hugging Face causal LM or encoder-decoder (``model.architecture``; weights in
    ``model.dtype``) and its tokenizer (pad token set to EOS if missing). The architecture was read
    from the same config.json in ``validate``. T5 keeps its ``wo`` in float32 under a bf16 / fp16
    ``model.dtype`` (transformers' ``_keep_in_fp32_modules``: T5's FFN output overflows in fp16).
    A GGUF file loads from its dequantized copy in ``cache_dir`` (:mod:`moe_lora.model.gguf`)."""
    path = model_folder(cfg, cache_dir, progress)
    config = AutoConfig.from_pretrained(path) if cfg.gguf_file else checkpoint_config(cfg)
    auto = AutoModelForSeq2SeqLM if is_seq2seq(cfg, config) else AutoModelForCausalLM
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # tokenizers raises a bare Exception for a damaged tokenizer.json
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path!r}: the tokenizer in {path} cannot be loaded ({first_line(exc, 160)})"
        ) from None
    try:
        model = auto.from_pretrained(
            path,
            dtype=getattr(torch, cfg.dtype),
            attn_implementation=attn_implementation(cfg),
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError, SafetensorError) as exc:  # missing or damaged weights (not memory: re-raised)
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path!r}: the weights in {path} cannot be loaded ({first_line(exc, 160)})"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok
