"""HydraLoRA's analysis: LoRAs trained separately per task from one init seed have similar A
matrices and different B matrices.

Runs that qualify: plain LoRA runs whose data has exactly one instruction task. Runs sharing a seed
(hence an init) are compared pairwise across tasks, per adapted linear, by the cosine similarity of
the flattened matrices; reported for the raw matrices and for their change since initialisation
(needs ``adapter_init.safetensors``, written with ``recipe.save_init_adapter=true``; B starts at 0,
so its change is B itself).
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

from moe_lora.errors import first_line
from moe_lora.report.collect import Run

log = logging.getLogger(__name__)


def readable(path: Path) -> bool:
    """Whether a safetensors file is whole (its header parses and covers the file; cheap: no tensor
    is read). A damaged one is left out of the analysis with a warning naming it."""
    if not path.exists():
        return False
    try:
        with safe_open(str(path), "numpy"):
            return True
    except Exception as exc:  # SafetensorError (cut short, bad header), OSError
        log.warning("left out of the A/B analysis: %s cannot be read (%s)", path, first_line(exc, 120))
        return False


def task_loras(runs: list[Run]) -> dict[int, dict[str, Path]]:
    """seed -> {task: run folder} for single-task LoRA runs with saved adapters."""
    out: dict[int, dict[str, Path]] = defaultdict(dict)
    for run in runs:
        r = run.results
        if r is None or r.get("adapter") != "lora" or not readable(run.path / "adapter_model.safetensors"):
            continue
        tasks = r.get("config", {}).get("data", {}).get("instruction_tasks", [])
        if len(tasks) == 1:
            out[r["seed"]][tasks[0]] = run.path
    return {s: t for s, t in out.items() if len(t) >= 2}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _matrices(folder: Path, init: bool) -> dict[str, np.ndarray]:
    state = load_file(str(folder / "adapter_model.safetensors"))
    if init:
        start = load_file(str(folder / "adapter_init.safetensors"))
        state = {k: v - start[k] for k, v in state.items()}
    return state


def similarities(groups: dict[int, dict[str, Path]]) -> list[dict]:
    """Mean pairwise cosine of A and of B over modules and task pairs, per seed and measure."""
    rows = []
    for seed, tasks in sorted(groups.items()):
        has_init = all(readable(p / "adapter_init.safetensors") for p in tasks.values())
        for measure in ("raw", "change since init") if has_init else ("raw",):
            mats = {t: _matrices(p, measure != "raw") for t, p in tasks.items()}
            cos = {"A": [], "B": []}
            for t1, t2 in itertools.combinations(sorted(mats), 2):
                for key in mats[t1]:
                    kind = "A" if key.endswith("lora_A") else "B" if key.endswith("lora_B") else None
                    if kind:
                        cos[kind].append(_cos(mats[t1][key], mats[t2][key]))
            rows.append(
                {
                    "seed": seed,
                    "measure": measure,
                    "tasks": sorted(tasks),
                    "cos_A": float(np.mean(cos["A"])),
                    "cos_B": float(np.mean(cos["B"])),
                }
            )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| seed | measure | tasks | mean cos(A_i, A_j) | mean cos(B_i, B_j) |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['seed']} | {r['measure']} | {', '.join(r['tasks'])} | {r['cos_A']:.3f} | {r['cos_B']:.3f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def projection_plot(groups: dict[int, dict[str, Path]], path: Path) -> bool:
    """2-D PCA of every task LoRA's flattened A (left) and B (right) matrices, coloured by task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(seed, task, _matrices(p, False)) for seed, tasks in groups.items() for task, p in tasks.items()]
    if len(points) < 3:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), layout="constrained")
    for ax, kind in zip(axes, ("lora_A", "lora_B"), strict=True):
        x = np.stack([np.concatenate([m[k].ravel() for k in sorted(m) if k.endswith(kind)]) for _, _, m in points])
        x = x - x.mean(0)
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        xy = u[:, :2] * s[:2]
        for task in sorted({t for _, t, _ in points}):
            idx = [i for i, (_, t, _) in enumerate(points) if t == task]
            ax.scatter(xy[idx, 0], xy[idx, 1], label=task)
        ax.set(title=f"{kind[-1]} matrices (PCA)", xlabel="PC 1", ylabel="PC 2")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
