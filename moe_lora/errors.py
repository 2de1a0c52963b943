"""User-facing errors: one line, naming the offending key or file, raised before any training."""

from __future__ import annotations


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
