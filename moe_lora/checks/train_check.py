"""The training half of the GPU check: ``moe-lora train experiment=loramoe_forgetting_paper
+arm=loramoe_lbc`` on a local random checkpoint and local data files, run three ways.

* **reference**: uninterrupted, checkpointing every ``save_every`` steps;
* **killed + resumed**: the same command as a subprocess, SIGKILLed once a checkpoint exists, then
  ``resume=auto`` in the same run directory; its end is compared with the reference's (adapter
  file, ``loss`` lines, routing log, results metrics): bitwise, or within :data:`RTOL`;
* **fsdp**: the recipe under ``recipe.strategy=fsdp`` for a few steps (with one rank the runner
  trains unsharded, which results.json's ``perf.strategy`` shows; :mod:`.fsdp_check` shards on one).

The reference and the resume run in this process through :func:`moe_lora.cli.main`, exactly as the
command line would; only the run that is killed needs a process of its own.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_lora import outputs
from moe_lora.cli import main

EXPERIMENT = ["experiment=loramoe_forgetting_paper", "+arm=loramoe_lbc"]
# a resumed run on a GPU may differ from the uninterrupted one in rounding (attention backward
# kernels accumulate in a nondeterministic order); on a CPU the check expects bitwise equality
RTOL = 2e-3


class CheckFailure(Exception):
    """A stage did not do what it should; the message is its one-line reason."""


@dataclass(frozen=True)
class TrainPlan:
    model_dir: Path
    data_root: Path
    cache_dir: Path
    steps: int
    save_every: int
    batch_size: int
    grad_accum: int
    num_train: int
    device: str
    extra: tuple[str, ...] = ()  # shape-specific overrides (data.max_length, eval limits, ...)
    threads: int | None = None
    hold: bool = False  # kill through moe_lora.checks.hold (a run too fast to catch mid-way)
    fsdp_steps: int = 10
    fsdp_ranks: int = 1
    kill_timeout_s: float = 600.0

    def overrides(self, run_dir: Path, steps: int | None = None) -> list[str]:
        """The command line of every run of the check: the preset, pointed at the local files."""
        threads = [f"recipe.threads={self.threads}"] if self.threads else []
        return [
            *EXPERIMENT,
            f"model.name_or_path={self.model_dir}",
            f"data.root={self.data_root}",
            f"data.num_train={self.num_train}",
            f"recipe.max_steps={steps or self.steps}",
            f"recipe.save_every={self.save_every}",
            f"recipe.batch_size={self.batch_size}",
            f"recipe.grad_accum={self.grad_accum}",
            "recipe.log_every=1",  # every step's loss line: the resume comparison is per step
            f"recipe.device={self.device}",
            *threads,
            *self.extra,
            f"cache_dir={self.cache_dir}",
            f"hydra.run.dir={run_dir}",
        ]


def train_in_process(args: list[str]) -> None:
    """``moe-lora train args`` here; a non-zero exit is a :class:`CheckFailure`."""
    try:
        code = main(["train", *args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    if code != 0:
        raise CheckFailure(f"moe-lora train exited with {code} ({' '.join(args[-1:])})")


def read_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / outputs.RESULTS
    if not path.exists():
        raise CheckFailure(f"{path} was not written")
    return json.loads(path.read_text())


def perf_summary(run_dir: Path) -> dict[str, Any]:
    """Tokens/s, peak memory, ranks and strategy of a finished run, from its results.json."""
    res = read_results(run_dir)
    perf = res.get("perf", {})
    losses = [r["loss"] for r in loss_rows(run_dir)]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise CheckFailure(f"{run_dir}: the loss lines are missing or not finite")
    return {
        "run_dir": str(run_dir),
        "tokens_per_s": perf.get("tokens_per_s"),
        "peak_mem_bytes": perf.get("peak_mem_bytes"),
        "ranks": perf.get("ranks"),
        "strategy": perf.get("strategy"),
        "final_loss": losses[-1],
        "steps": len(losses),
    }


def reference(plan: TrainPlan, run_dir: Path) -> dict[str, Any]:
    train_in_process(plan.overrides(run_dir))
    return perf_summary(run_dir)


def checkpoints_in(run_dir: Path) -> list[str]:
    root = run_dir / outputs.CHECKPOINTS
    return sorted((p.name for p in root.glob("step-*")), key=lambda n: int(n.split("-")[1])) if root.is_dir() else []


def killed(plan: TrainPlan, run_dir: Path, log: Path) -> dict[str, Any]:
    """Start the run as a subprocess, SIGKILL it as soon as ``checkpoints/step-<save_every>`` exists."""
    wrapper = ["-m", "moe_lora.checks.hold", str(plan.save_every)] if plan.hold else ["-m", "moe_lora"]
    cmd = [sys.executable, *wrapper, "train", *plan.overrides(run_dir)]
    first = run_dir / outputs.CHECKPOINTS / f"step-{plan.save_every}"
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + plan.kill_timeout_s
        while not first.is_dir() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if child.poll() is not None:
            raise CheckFailure(f"the run to kill exited ({child.returncode}) before {first.name} appeared; see {log}")
        if not first.is_dir():
            child.kill()
            child.wait()
            raise CheckFailure(f"no {first.name} within {plan.kill_timeout_s:.0f} s; see {log}")
        os.kill(child.pid, signal.SIGKILL)
        code = child.wait()
    if (run_dir / outputs.RESULTS).exists():
        raise CheckFailure("the killed run had finished (results.json exists): nothing was interrupted")
    return {"killed_after": first.name, "returncode": code, "checkpoints_at_kill": checkpoints_in(run_dir)}


def resumed(plan: TrainPlan, run_dir: Path) -> dict[str, Any]:
    train_in_process([*plan.overrides(run_dir), "resume=auto"])
    return perf_summary(run_dir)


def fsdp(plan: TrainPlan, run_dir: Path) -> dict[str, Any]:
    """``recipe.strategy=fsdp`` for ``fsdp_steps`` steps on ``fsdp_ranks`` ranks (the global batch
    kept: ``batch_size / ranks`` per rank where it divides)."""
    ranks = plan.fsdp_ranks
    per_rank = plan.batch_size // ranks if plan.batch_size % ranks == 0 else plan.batch_size
    args = [
        *plan.overrides(run_dir, steps=plan.fsdp_steps),
        "recipe.strategy=fsdp",
        f"recipe.nproc_per_node={ranks}",
        f"recipe.batch_size={per_rank}",
        "recipe.save_every=null",
    ]
    train_in_process(args)
    out = perf_summary(run_dir)
    if ranks > 1 and out["strategy"] != "fsdp":
        raise CheckFailure(f"{ranks} ranks but results.json perf.strategy is {out['strategy']!r}, not 'fsdp'")
    out["sharded"] = out["strategy"] == "fsdp"
    return out


# ------------------------------------------------------------------------------------ comparison
def loss_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in outputs_rows(run_dir / outputs.METRICS) if "loss" in r]


def outputs_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict, by dotted key (booleans and None left out)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in numbers(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("."): float(tree)}
    return {}


def max_diff(a: dict[str, float], b: dict[str, float]) -> tuple[float, float]:
    """(largest absolute, largest relative to ``b``, the reference) difference over the keys (inf
    where the key sets differ)."""
    if a.keys() != b.keys():
        return math.inf, math.inf
    diffs = [(abs(a[k] - b[k]), abs(a[k] - b[k]) / max(abs(b[k]), 1e-12)) for k in a]
    return max((d[0] for d in diffs), default=0.0), max((d[1] for d in diffs), default=0.0)


def compare(run: Path, ref: Path, rtol: float = RTOL) -> dict[str, Any]:
    """The resumed run's end against the uninterrupted run's: which files are bitwise equal, and the
    largest differences of the per-step losses and of results.json's metrics."""
    loss, ref_loss = loss_rows(run), loss_rows(ref)
    if [r["step"] for r in loss] != [r["step"] for r in ref_loss]:
        raise CheckFailure(f"loss lines at steps {[r['step'] for r in loss]} vs {[r['step'] for r in ref_loss]}")
    flat = {f"{r['step']}.{k}": r[k] for r in loss for k in ("loss", "aux_loss") if k in r}
    ref_flat = {f"{r['step']}.{k}": r[k] for r in ref_loss for k in ("loss", "aux_loss") if k in r}
    loss_abs, loss_rel = max_diff(flat, ref_flat)
    met_abs, met_rel = max_diff(numbers(read_results(run)["metrics"]), numbers(read_results(ref)["metrics"]))
    same = {name: (run / name).read_bytes() == (ref / name).read_bytes() for name in (outputs.ADAPTER, outputs.ROUTING)}
    out = {
        "adapter_bitwise": same[outputs.ADAPTER],
        "routing_bitwise": same[outputs.ROUTING],
        "loss_lines_equal": flat == ref_flat,
        "max_loss_abs_diff": loss_abs,
        "max_loss_rel_diff": loss_rel,
        "metrics_equal": met_abs == 0.0,
        "max_metric_abs_diff": met_abs,
        "max_metric_rel_diff": met_rel,
        "rtol": rtol,
    }
    out["bitwise"] = all(out[k] for k in ("adapter_bitwise", "routing_bitwise", "loss_lines_equal", "metrics_equal"))
    out["within_tolerance"] = out["bitwise"] or (loss_rel <= rtol and met_rel <= rtol)
    return out
