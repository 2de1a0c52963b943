"""Fetch the sources of a data config from the hub and save them under ``<root>/<name>``.

Run it where there is internet (a login node); training nodes then read ``data.root`` offline:

    python scripts/prepare_data.py --data cbqa_instruct_hub --root /shared/data
    python scripts/prepare_data.py --sources triviaqa nq_open --root /shared/data
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


def wanted(args: argparse.Namespace) -> dict[str, Any]:
    """Source name -> SourceConfig, composed by Hydra exactly as a training run composes them."""
    from moe_lora.compose import load_config

    if args.data:
        return dict(load_config([f"data={args.data}"], check_files=False).data.sources)
    overrides = [f"+source@data.sources.{name}={name}" for name in args.sources]
    return dict(load_config(["data=world_mix", *overrides], check_files=False).data.sources)


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


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ["HF_DATASETS_OFFLINE"] = "0"  # before datasets is imported: this script downloads
    os.environ["HF_HUB_OFFLINE"] = "0"
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from moe_lora.errors import ConfigError, one_line

    try:
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
