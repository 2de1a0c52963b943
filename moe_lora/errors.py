"""User-facing errors: one line, naming the offending key or file, raised before any training."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value or input file is wrong; the message names the key (``adapter.top_k=9 ...``)."""


def require(cond: bool, key: str, value: object, why: str) -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``cond`` holds. Used instead of ``assert``."""
    if not cond:
        raise ConfigError(f"{key}={value!r} {why}")
