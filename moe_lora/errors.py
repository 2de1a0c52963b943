"""User-facing errors: one line, naming the offending key or file, raised before any training."""

from __future__ import annotations

import difflib
import sys


class ConfigError(ValueError):
    """A config value or input file is wrong; the message names the key (``adapter.top_k=9 ...``)."""


class OutputError(ConfigError):
    """The run directory cannot be written (full disk, no permission, a file where a folder should
    be). A ``ConfigError`` so that the CLI prints it as one ``moe-lora: error:`` line; the ``OSError``
    is its ``__cause__``."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name if it has none), for errors that
    wrap a library's multi-line message into one line."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def require(cond: bool, key: str, value: object, why: str) -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``cond`` holds. Used instead of ``assert``."""
    if not cond:
        raise ConfigError(f"{key}={value!r} {why}")


def fail(message: str, code: int = 2) -> int:
    print(f"moe-lora: error: {message}", file=sys.stderr)
    return code


def one_line(exc: BaseException) -> str:
    """Hydra and OmegaConf errors span several lines; keep the outer and innermost first lines."""
    from hydra.errors import MissingConfigException

    if isinstance(exc, MissingConfigException) and exc.options:
        missing = (exc.missing_cfg_file or "").split("/")[-1]
        close = difflib.get_close_matches(missing, exc.options, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{str(exc).splitlines()[0]}{hint} (available: {', '.join(sorted(exc.options))})"
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, OverrideParseException) and exc.override and exc.override not in str(exc):
        return f"cannot parse override {exc.override!r}: {str(exc).strip().splitlines()[0]}"
    inner, cur = exc, exc
    while (cur := cur.__cause__ or cur.__context__) is not None:  # first formatted Hydra/OmegaConf cause
        if isinstance(cur, (HydraException, OmegaConfBaseException)) and "$" not in str(cur):
            inner = cur
            break
    first = first_line(exc)
    if inner is exc:
        return first
    detail = first_line(inner)
    return first if detail in first else f"{first.rstrip('.')}: {detail}"
