"""Data kinds by name: what a run fine-tunes and evaluates on (the built-in world, the toy T0, real
sources, P3, ...), each with its checks and its builder, in one registry.

A kind is one file in ``moe_lora/recipes/kinds/``, which builds a :class:`DataKind` and calls
:func:`register_kind` at import; importing that package imports every file in it, so ``validate``
and the runner see the same registry. The kinds sit above what they draw on (this layer, the world,
evaluation), so none of those imports a kind; a module elsewhere (a test, a user's code) may
register one too.

A config asks for a kind through its own settings (``matches``: ``data.p3`` lists datasets,
``data.sources`` is not empty, ...). At most one kind may be asked for: a config asking for two
fails in one line (a mixture that used one and ignored the other would be a silent subset). A
config asking for none gets the default kind (the built-in world).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moe_lora.config import DataConfig, TrainConfig
from moe_lora.data.example import Mixture
from moe_lora.errors import ConfigError
from moe_lora.registry import Registry


@dataclass(frozen=True)
class DataEnv:
    """What a builder may use besides the config: the built-in world (``None`` unless the model is
    the world's or the kind ``needs_world``), and the loaded base model with its tokenizer and
    precision (a kind that splits its data by the base model's answers needs them)."""

    world: Any = None
    model: Any = None
    tokenizer: Any = None
    precision: Any = None
    progress: bool = True


@dataclass(frozen=True)
class ModelChecks:
    """What a kind's checks after the checkpoint's architecture is read may use: whether files are
    checked (off for parameter accounting), whether the adapter trains anything, and the base
    model's tokenizer (loaded on the first call: seconds for a hub model)."""

    files: bool
    trains: bool
    tokenizer: Callable[[], Any]


@dataclass(frozen=True)
class DataKind:
    """One data kind. ``build`` makes the mixture; the checks run in ``validate``, cheapest first,
    each only for the kind a config selects: ``check`` on the settings alone (no file opened),
    ``check_files`` that the datasets are there and readable (skipped for parameter accounting),
    ``check_model`` once ``cfg.model`` holds the checkpoint's architecture. ``matches`` says whether
    a data config asks for this kind, named by ``key`` in errors; ``None`` makes it the default
    (one kind at most)."""

    name: str
    build: Callable[[TrainConfig, DataEnv], Mixture]
    matches: Callable[[DataConfig], bool] | None = None
    key: str = ""
    needs_world: bool = False  # the builder reads the built-in world (DataEnv.world)
    check: Callable[[TrainConfig], None] | None = None
    check_files: Callable[[TrainConfig], None] | None = None
    check_model: Callable[[TrainConfig, ModelChecks], None] | None = None

    def __post_init__(self) -> None:
        if self.matches is not None and not self.key:
            raise ValueError(f"data kind {self.name!r}: a kind a config asks for names its setting (key)")


DATA_KINDS: Registry[DataKind] = Registry("data kind", "data kind")


def register_kind(kind: DataKind) -> DataKind:
    """Add ``kind`` to :data:`DATA_KINDS` (a second default, like a second name, is a bug)."""
    if kind.matches is None:
        default = next((k for k in DATA_KINDS if DATA_KINDS.get(k).matches is None), None)
        if default is not None:
            raise ValueError(f"data kinds {default!r} and {kind.name!r} are both the default")
    return DATA_KINDS.register(kind.name, kind)


def kind_of(data: DataConfig) -> DataKind:
    """The kind ``data`` asks for, else the default. Asking for two fails in one line."""
    asked = [DATA_KINDS.get(n) for n in DATA_KINDS if DATA_KINDS.get(n).matches is not None]
    asked = [k for k in asked if k.matches(data)]
    if len(asked) > 1:
        a, b = asked[:2]
        raise ConfigError(
            f"{a.key} and {b.key} are both set: a mixture is of one data kind ({a.name} or {b.name}), not both"
        )
    if asked:
        return asked[0]
    default = [DATA_KINDS.get(n) for n in DATA_KINDS if DATA_KINDS.get(n).matches is None]
    if not default:
        raise ConfigError(
            f"data={data.name!r} asks for no data kind and none is the default (known: {', '.join(DATA_KINDS)})"
        )
    return default[0]
