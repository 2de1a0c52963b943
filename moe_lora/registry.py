"""One small registry type for every extension point, with did-you-mean errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from moe_lora.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> item. Registering a name twice is a bug; looking up an unknown name is a user error."""

    def __init__(self, kind: str, key: str) -> None:
        self.kind, self.key = kind, key
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"{self.kind} name {name!r} must be a non-empty identifier")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{self.key}={name!r} is not a known {self.kind}{hint} (known: {', '.join(self)})")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
