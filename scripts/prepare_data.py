"""Fetch the sources of a data config from the hub and save them under ``<root>/<name>``.

Run it where there is internet (a login node); training nodes then read ``data.root`` offline:

    python scripts/prepare_data.py --data cbqa_instruct_hub --root /shared/data
    python scripts/prepare_data.py --sources triviaqa nq_open --root /shared/data
    python scripts/prepare_data.py --data p3_t0 --root /shared/p3   # P3: one folder per config
    moe-lora train data=cbqa_instruct_hub data.root=/shared/data ...

Each source is written with ``save_to_disk`` into a temporary folder and renamed into place, so an
interrupted download never leaves a half-written ``<root>/<name>`` that a run would trust.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_lora.outputs import atomic_dir

CONF_SOURCES = Path(__file__).resolve().parent.parent / "conf" / "source"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Download the datasets of a data config into data.root (save_to_disk).")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="a conf/data name, e.g. cbqa_instruct_hub: every source of that mix")
    what.add_argument(
        "--sources",
        nargs="+",
        metavar="NAME",
        help=f"conf/source names ({', '.join(sorted(x.stem for x in CONF_SOURCES.glob('*.yaml')))})",
    )
    p.add_argument("--root", required=True, help="folder of prepared datasets (pass it as data.root)")
    p.add_argument("--overwrite", action="store_true", help="replace sources that are already there")
    p.add_argument("--dry-run", action="store_true", help="print what would be fetched, fetch nothing")
    return p.parse_args(argv)


def data_config(overrides: list[str]) -> Any:
    """The ``data`` group composed by Hydra exactly as a training run composes it, checked by its
    schema; not the cross-group checks of a run, which refuse real data for the default (built-in
    world) model: preparing files needs no model."""
    from omegaconf import OmegaConf

    from moe_lora.recipes.compose import compose

    return OmegaConf.to_object(compose(overrides)).data


def wanted(args: argparse.Namespace) -> dict[str, Any]:
    """Source name -> SourceConfig."""
    if args.data:
        return dict(data_config([f"data={args.data}"]).sources)
    overrides = [f"+source@data.sources.{name}={name}" for name in args.sources]
    return dict(data_config(["data=world_mix", *overrides]).sources)


def hub_loader(path: str, config: str | None) -> Any:
    import datasets

    return datasets.load_dataset(path, config)


def save_atomic(name: str, dataset: Any, root: Path) -> Path:
    """``save_to_disk`` into a temporary ``<root>/.<name>.*`` then swapped in as ``<root>/<name>``."""
    with atomic_dir(root / name) as tmp:
        dataset.save_to_disk(str(tmp))
    return root / name


def prepare(
    sources: dict[str, Any],
    root: Path,
    overwrite: bool = False,
    dry_run: bool = False,
    load: Callable[[str, str | None], Any] = hub_loader,
) -> list[Path]:
    """Fetch and save every source not already under ``root`` (or all, with ``overwrite``)."""
    written = []
    for name, src in sources.items():
        target = root / name
        label = f"{src.path}" + (f" ({src.config})" if src.config else "")
        if target.exists() and not overwrite:
            print(f"skip   {name}: {target} exists (--overwrite to replace)")
            continue
        if dry_run:
            print(f"would  {name}: {label} -> {target}")
            continue
        dataset = load(src.path, src.config)
        root.mkdir(parents=True, exist_ok=True)
        save_atomic(name, dataset, root)
        splits = ", ".join(f"{s}={len(d)}" for s, d in dataset.items()) if hasattr(dataset, "items") else len(dataset)
        print(f"wrote  {name}: {label} -> {target} [{splits}]")
        written.append(target)
    return written


P3 = "bigscience/P3"


def hub_configs(path: str) -> list[str]:
    import datasets

    from moe_lora.errors import ConfigError, first_line

    try:
        return datasets.get_dataset_config_names(path)
    except Exception as exc:  # offline, or the hub refused: one line, not a traceback
        raise ConfigError(f"cannot list the configs of {path} ({first_line(exc)})") from None


def p3_configs(p3: Any, available: list[str]) -> list[str]:
    """The P3 configs of ``data.p3``'s datasets (``_score_eval`` twins left out), by the rule the
    reader uses (``data/p3.py``: a config goes to the longest dataset name it starts with)."""
    from moe_lora.data.p3 import _matches

    names = [*p3.train_datasets, *p3.eval_datasets]
    return [c for c in available if not c.endswith("_score_eval") and any(_matches(n, c) for n in names)]


def prepare_p3(
    p3: Any,
    root: Path,
    overwrite: bool = False,
    dry_run: bool = False,
    list_configs: Callable[[str], list[str]] = hub_configs,
    load: Callable[[str, str | None], Any] = hub_loader,
) -> list[Path]:
    """Every P3 config of the listed datasets saved as ``<root>/<config>``."""
    configs = p3_configs(p3, list_configs(P3))
    missing = [
        n for n in [*p3.train_datasets, *p3.eval_datasets] if not p3_configs(type(p3)(train_datasets=[n]), configs)
    ]
    for name in missing:
        print(f"warn   {name}: no config of {P3} starts with it")
    return prepare({c: _P3Source(P3, c) for c in configs}, root, overwrite, dry_run, load)


class _P3Source:
    def __init__(self, path: str, config: str) -> None:
        self.path, self.config = path, config


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ["HF_DATASETS_OFFLINE"] = "0"  # before datasets is imported: this script downloads
    os.environ["HF_HUB_OFFLINE"] = "0"
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from moe_lora.errors import ConfigError, one_line

    try:
        if args.data:
            data = data_config([f"data={args.data}"])
            if data.p3.enabled:
                prepare_p3(data.p3, Path(args.root), args.overwrite, args.dry_run)
                return 0
        sources = wanted(args)
    except (ConfigError, HydraException, OmegaConfBaseException) as exc:
        print(f"prepare_data: error: {one_line(exc)}", file=sys.stderr)
        return 2
    if not sources:
        print(
            f"prepare_data: error: data={args.data} has no data.sources (the built-in world needs no data)",
            file=sys.stderr,
        )
        return 2
    prepare(sources, Path(args.root), args.overwrite, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
