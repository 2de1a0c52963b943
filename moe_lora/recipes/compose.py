"""Config composition and the checks made before Hydra starts a job.

Every config the command line describes (each combination of a multirun sweep) is composed and
validated here, so bad input gets a one-line error naming the key, exits non-zero and leaves no run
directory behind; the output folder is checked before anything is created.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf, open_dict

import moe_lora.adapters
import moe_lora.config  # noqa: F401
from moe_lora.config import resolved_config
from moe_lora.env import register_resolvers
from moe_lora.errors import ConfigError, one_line
from moe_lora.recipes.validate import validate
from moe_lora.train.checkpoint import plan

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
_HYDRA_VALUE_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--info",
    "-i",
}
_HYDRA_FLAGS = {"-m", "--multirun", "--resolve", "--run", "-r", "--help", "-h", "--hydra-help", "--version"}
SKIP_PRECHECK = {
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--help",
    "-h",
    "--hydra-help",
    "--version",
    "--info",
    "-i",
    "--experimental-rerun",
}
# flags that show (help, a config, Hydra's info) instead of running, and those that change where
# the config comes from (then only Hydra composes it)
SHOW_FLAGS = {"--help", "-h", "--cfg", "-c", "--info", "-i"}
CONFIG_SOURCE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}

register_resolvers()


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides)."""
    flags, overrides = [], []
    it = iter(args)
    for a in it:
        if a in _HYDRA_VALUE_FLAGS:
            flags += [a, next(it, "")]
        elif a in _HYDRA_FLAGS or a.startswith("--"):
            flags.append(a)
        else:
            overrides.append(a)
    return flags, overrides


def _axes(overrides: list[str]) -> list[list[str]]:
    """Per override, the values a basic multirun would take (``key=value`` each): a sweep's values,
    both ends of a search interval (Optuna), or the override itself."""
    axes = []
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.get_key_element()
        if o.is_interval_sweep():  # a search space (Optuna): check both of its ends
            axes.append([f"{key}={o.value().start}", f"{key}={o.value().end}"])
        elif o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return axes


def expand_sweeps(overrides: list[str], limit: int = 256) -> list[list[str]]:
    """Every combination a basic multirun would launch (hydra/* overrides are left out, except
    ``hydra.searchpath``: it decides which config files composition finds)."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("hydra") or o.startswith("hydra.searchpath")]
    return [list(c) for c in itertools.islice(itertools.product(*_axes(kept)), limit)]


def first_job(overrides: list[str]) -> list[str]:
    """The command line of a multirun's first job, hydra/* overrides included: every sweep
    (``a=1,2``, ``range``, ``interval``) replaced by its first value, so that it composes."""
    return [axis[0] for axis in _axes(overrides)]


def compose(overrides: list[str], return_hydra_config: bool = False):
    """The composed config; an override naming a key the config does not have is a one-line
    ``ConfigError`` with a did-you-mean, the keys there, or the ``+key=value`` that adds it."""
    try:
        return _compose(overrides, return_hydra_config)
    except ConfigCompositionException as exc:
        message = unknown_key_message(exc, overrides)
        if message is None:
            raise
    raise ConfigError(message)


def _compose(overrides: list[str], return_hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="moe_lora"):
        return hydra_compose(config_name="train", overrides=overrides, return_hydra_config=return_hydra_config)


def unknown_key_message(exc: Exception, overrides: list[str]) -> str | None:
    """For Hydra's "Could not override 'KEY'" (a key, or a group, the config does not have): its
    first lines and a hint from the config composed without that override. Hydra's own hint
    (``+KEY=VALUE``) is kept only where adding makes sense: a group missing from the defaults list,
    a free-form map (``data.sources``), or a new top-level key (a tag); a typo gets a did-you-mean,
    a schema's unknown key the keys it has. None for any other error."""
    match = re.match(r"Could not override '([^']+)'\.", str(exc))
    bad = [o for o in overrides if match and o.split("=", 1)[0] == match[1]]
    if not bad:
        return None
    key, text = match[1], one_line(exc)
    if "No match in the defaults list" in str(exc):
        return f"{text.rstrip('.')}: {key!r} is a group not chosen by default; add it with +{bad[-1]}"
    try:
        cfg = _compose([o for o in overrides if o not in bad], return_hydra_config=key.startswith("hydra"))
    except Exception:
        return None
    return f"{text}{key_hint(cfg, key, bad[-1])}"


def key_hint(cfg, key: str, override: str) -> str:
    """``; did you mean adapter.num_experts?``, ``; keys of adapter: ...`` or ``; add it with +...``
    for a dotted ``key`` missing from ``cfg``."""
    parts, node, depth = key.split("."), cfg, 0
    while depth < len(parts) and isinstance(node, DictConfig) and parts[depth] in node:
        node, depth = node[parts[depth]], depth + 1
    if not isinstance(node, DictConfig) or depth == len(parts):
        return ""
    keys = [str(k) for k in node]
    close = difflib.get_close_matches(parts[depth], keys, n=1)
    if close:
        return f"; did you mean {'.'.join([*parts[:depth], close[0], *parts[depth + 1 :]])}?"
    where = ".".join(parts[:depth])
    if depth == 0 or OmegaConf.get_type(node) is dict:  # a new top-level key (a tag) or a map entry
        return f"; to add a key the config does not have use +{override}" + (
            " (moe-lora itself does not read it: e.g. a tag for folder names)" if depth == 0 else ""
        )
    return f"; keys of {where}: {', '.join(keys)}"


def to_config(dcfg, check_files: bool = True):
    """DictConfig -> validated TrainConfig (runs every ``__post_init__`` and the cross checks)."""
    try:
        cfg = OmegaConf.to_object(dcfg)
    except Exception as exc:  # OmegaConf wraps errors raised in __post_init__
        inner = exc
        while inner is not None and not isinstance(inner, ConfigError):
            inner = inner.__cause__ or inner.__context__
        raise (inner or exc) from None
    validate(cfg, check_files)
    return cfg


def load_config(overrides: list[str], check_files: bool = True):
    return to_config(compose(overrides), check_files)


def precheck(overrides: list[str], multirun: bool):
    """Every job's config validated and the output folder checked; the first job's config. The
    first job is composed once, with Hydra's node (its folder), as ``hydra.compose`` would give it
    without: the same config with ``hydra`` deleted."""
    combos = expand_sweeps(overrides) if multirun else [overrides]
    first = compose(combos[0], return_hydra_config=True)
    job = first.copy()  # shallow: deleting its hydra node leaves first's
    with open_dict(job):
        del job["hydra"]
    cfgs = [to_config(job), *(load_config(combo) for combo in combos[1:])]
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    check_output_dir(key, Path(OmegaConf.select(first, key)), cfgs[0])
    return cfgs[0]


def check_output_dir(key: str, out: Path, cfg) -> None:
    """Before Hydra creates anything: the run (sweep) folder can be created, and a run folder holds
    no earlier run's results nor checkpoints unless ``resume`` says to continue it."""
    if key == "hydra.run.dir":
        plan(out, cfg.resume, resolved_config(cfg), sweep=False)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(out)!r} cannot be created: {probe} is not a writable folder")
