"""Measure how far the default experiment moves when the CPU changes, on one machine.

Another CPU runs other kernels: ATen picks its AVX-512, AVX2 or scalar kernels by the instruction
set (weight initialisation, every element-wise op and reduction), MKL picks its GEMM branch, and
the thread count splits reductions. This script runs ``moe-lora train`` (plus your overrides) once
per emulated CPU, each in its own cache (the world model is pretrained again under that CPU's
numerics), then writes from the runs' results.json:

- ``docs/reproducibility/runs/<cpu>.json``: each run's record (metrics, numerics, config);
- ``moe_lora/world/spread.json``: the spread the run summary quotes (:mod:`moe_lora.world.spread`);
- the table in ``docs/reproducibility.md`` between its ``spread`` markers.

    python scripts/numerics_spread.py --root /tmp/spread             # run what is missing, write
    python scripts/numerics_spread.py --root /tmp/spread --only native
    python scripts/numerics_spread.py --write-only                   # re-render from the run records

A run whose ``results.json`` exists under ``--root`` is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from moe_lora.world.spread import SPREAD_FILE, render_table, run_overrides, summarise

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "docs" / "reproducibility" / "runs"
PAGE = REPO / "docs" / "reproducibility.md"
BEGIN, END = "<!-- spread:begin (scripts/numerics_spread.py writes this table) -->", "<!-- spread:end -->"
# name -> environment that makes this CPU compute like another one (set before torch is imported)
EMULATED = {
    "native": {},  # this machine as it is
    "scalar-kernels": {"ATEN_CPU_CAPABILITY": "default"},  # a CPU without AVX2: ATen's scalar kernels
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},  # MKL's SSE2 GEMM branch instead of its AVX2 one
}
KEPT = ("adapter", "model", "data", "layout", "recipe", "seed", "metrics", "numerics", "wall_s", "config")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the default experiment under emulated CPUs; write the spread.")
    p.add_argument("--root", type=Path, help="folder of the runs and their world-model caches")
    p.add_argument("--only", nargs="*", choices=sorted(EMULATED), help="run these emulated CPUs only")
    p.add_argument("--threads", type=int, default=1, help="recipe.threads of every run (default 1)")
    p.add_argument("--write-only", action="store_true", help="no runs: rewrite spread.json and the page")
    p.add_argument("overrides", nargs="*", help="moe-lora train overrides (default: none, as `make run`)")
    return p.parse_args(argv)


def run_one(name: str, root: Path, threads: int, overrides: list[str]) -> Path:
    out = root / name
    results = out / "run" / "results.json"
    if results.exists():
        return results
    env = {**os.environ, **EMULATED[name], "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "moe_lora", "train", *overrides, f"recipe.threads={threads}"]
    cmd += [f"cache_dir={out / 'cache'}", f"hydra.run.dir={out / 'run'}"]
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, env=env, check=True)
    return results


def record(name: str, results: Path) -> dict:
    full = json.loads(results.read_text())
    kept = {k: full[k] for k in KEPT if k in full}
    overrides = run_overrides(results.parent)
    return {"name": name, "env": EMULATED[name], "overrides": overrides, **kept}


def write(records: list[dict]) -> None:
    spread = summarise(
        [{k: r[k] for k in ("name", "env", "overrides", "metrics", "numerics", "wall_s", "config")} for r in records]
    )
    SPREAD_FILE.write_text(json.dumps(spread, indent=1, sort_keys=True) + "\n")
    page = PAGE.read_text()
    head, rest = page.split(BEGIN)
    _, tail = rest.split(END)
    PAGE.write_text(f"{head}{BEGIN}\n{render_table(spread)}\n{END}{tail}")
    print(render_table(spread))


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    RUNS.mkdir(parents=True, exist_ok=True)
    if not a.write_only:
        if a.root is None:
            raise SystemExit("numerics_spread: --root is required unless --write-only")
        for name in a.only or EMULATED:
            rec = record(name, run_one(name, a.root, a.threads, a.overrides))
            (RUNS / f"{name}.json").write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    records = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]
    if records:
        write(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
