"""One training job inside Hydra (``moe-lora train``): plan the run directory (new, resume, skip,
rerun), start the ranks (torchrun, ``recipe.nproc_per_node``, submitit tasks), run, and turn what
can go wrong (a failure, a preemption, a one-line error) into files and exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf

import moe_lora.adapters
import moe_lora.config  # noqa: F401  (the schemas, for Hydra's own --help, --cfg and --info too)
from moe_lora import outputs
from moe_lora.config import resolved_config
from moe_lora.env import set_environment
from moe_lora.errors import ConfigError, fail, one_line
from moe_lora.recipes.compose import (
    CONF_DIR,
    CONFIG_SOURCE_FLAGS,
    SHOW_FLAGS,
    SKIP_PRECHECK,
    compose,
    first_job,
    load_config,
    precheck,
    split_args,
    to_config,
)
from moe_lora.recipes.results import summary_table
from moe_lora.recipes.runner import run
from moe_lora.recipes.studies import resume_overrides
from moe_lora.tracking import write_json_atomic
from moe_lora.train import checkpoint, distributed, preempt
from moe_lora.train.distributed import destroy, env_world_size
from moe_lora.train.loop import Preempted


def remove_fresh_run_dir(run_dir: Path) -> None:
    """Undo what Hydra (and moe-lora's marker) made for a job that never started, in a folder
    holding nothing else: a folder with a run in it, or with a lock file, is never touched."""
    fresh = {*outputs.HYDRA_FILES, outputs.RUN_MARKER}
    if not run_dir.is_dir() or set(os.listdir(run_dir)) - fresh:
        return
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    for name in sorted(fresh - {".hydra"}):
        (run_dir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()  # only if now empty


def train_job(dcfg) -> float | None:
    """The Hydra task function: the value `recipe.objective` (or the tuple `recipe.objectives`)
    names, for sweepers (rank 0). Rank 0 holds the run folder (its lock, see
    :func:`moe_lora.outputs.run_folder`) from before the plan to the end of the job."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    with contextlib.ExitStack() as held:
        cfg, dist, job = start_job(dcfg, hydra_cfg, run_dir, sweep, held)
        cfg, run_dir, job = dist.broadcast((cfg, run_dir, job))  # rank 0 decides; under torchrun the others wait
        results = run_planned(cfg, run_dir, dist, job, sweep)
    if not dist.is_main:
        return None
    print(summary_table(results))
    print(f"results: {run_dir / 'results.json'}")
    if not sweep:  # a sweep's jobs leave the line to the sweep's end (SweepEnd)
        print(report_line(run_dir), flush=True)
    return objective_value(results, cfg.recipe.objectives or cfg.recipe.objective)


def report_line(folder: Path) -> str:
    """The command that turns a run (a sweep) folder into tables and plots, ready to paste."""
    return f"report: moe-lora report {shlex.quote(str(folder))}"


class SweepEnd(Callback):
    """Hydra callback (``hydra.callbacks.sweep_end`` in conf/train.yaml): a sweep ends by printing
    its folder and the report command, whichever launcher or sweeper ran its jobs."""

    def on_multirun_end(self, config, **kwargs) -> None:
        folder = Path(str(config.hydra.sweep.dir))  # the launcher's: Hydra caches ${now:} per config
        print(f"sweep: {folder}", flush=True)
        print(report_line(folder), flush=True)


def start_job(dcfg, hydra_cfg, run_dir: Path, sweep: bool, held: contextlib.ExitStack):
    """The validated config, the rank group and (rank 0) the plan, with the run folder held in
    ``held``. A folder moe-lora did not make, or one a live job holds, is refused untouched; a
    config error undoes what Hydra made. Either ends a single run with one line, and a refused
    folder a sweep too (its jobs go on no further: the folder is someone else's, or in use)."""
    n_jobs = (
        OmegaConf.select(hydra_cfg, "launcher.n_jobs") if "joblib" in str(hydra_cfg.launcher.get("_target_")) else 1
    )
    try:
        cfg = to_config(dcfg)
        if cfg.recipe.threads is None and n_jobs and n_jobs > 1:  # parallel local jobs share the cores
            cfg.recipe.threads = max(1, (os.cpu_count() or 1) // n_jobs)
        check_launch(cfg.recipe.nproc_per_node)
        dist = distributed.init_distributed(cfg.recipe.device)  # ranks from torchrun or submitit's tasks
        if dist.is_main:  # only the planning process locks: other ranks never wait on it
            held.enter_context(outputs.run_folder(run_dir))
        job = checkpoint.plan(run_dir, cfg.resume, resolved_config(cfg), sweep) if dist.is_main else None
    except ConfigError as exc:
        if not isinstance(exc, outputs.RunFolderError):
            held.close()  # the lock goes first, then what Hydra made
            remove_fresh_run_dir(run_dir)
        if sweep and not isinstance(exc, outputs.RunFolderError):
            raise
        sys.exit(fail(one_line(exc)))
    return cfg, dist, job


def run_planned(cfg, run_dir: Path, dist, job, sweep: bool) -> dict | None:
    """Carry out the plan: skip (the earlier results), rerun (after clearing the failed attempt),
    resume or start."""
    if dist.is_main and job.action != "new":
        what = {
            "skip": "finished before with this config: skipped",
            "rerun": "the earlier attempt failed: rerun",
            "resume": f"resuming from {job.checkpoint.name if job.checkpoint else ''}",
        }[job.action]
        print(f"{run_dir}: {what}", flush=True)
    if job.action == "skip":
        return json.loads((run_dir / outputs.RESULTS).read_text())
    if dist.is_main and job.action == "rerun":
        checkpoint.clear_failed_attempt(run_dir)
    return run_or_record(cfg, run_dir, dist, job.checkpoint, sweep)


def objective_value(results: dict, paths: str | list[str]) -> float | tuple[float, ...] | None:
    """The number (or, for a list of paths, the tuple: multi-objective Optuna) a sweeper optimises;
    a missing or non-numeric one is None (a tuple with one is None as a whole: the trial failed)."""
    tree = OmegaConf.create(results)
    values = [OmegaConf.select(tree, p) for p in ([paths] if isinstance(paths, str) else paths)]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return float(values[0]) if isinstance(paths, str) else tuple(float(v) for v in values)


def run_or_record(cfg, run_dir: Path, dist, resume: Path | None, sweep: bool) -> dict | None:
    """Run (or spawn the ranks that run) one job. A failure is recorded in ``failure.json`` for
    `moe-lora report`; in a sweep the other jobs go on. A preemption exits with 75 after the
    checkpoint, handing the signal to the handler installed before for it (submitit requeues), a
    ^C with 130; a ``ConfigError`` raised while running (non-finite loss, full disk) ends a single
    run with its one line, not a traceback."""
    try:
        if cfg.recipe.nproc_per_node > 1:
            with preempt.preemption(forward=True) as stop:  # the workers checkpoint; this process waits
                try:
                    distributed.spawn(cfg.recipe.nproc_per_node, rank_worker, cfg, run_dir, resume)
                except Exception:
                    if stop():
                        raise Preempted(stop()) from None
                    raise
            return json.loads((run_dir / outputs.RESULTS).read_text())
        return run(cfg, run_dir, progress=True, dist=dist, resume=resume)
    except Preempted as exc:
        print(
            f"moe-lora: stopped by {preempt.name(exc.signum)} (signal {exc.signum}) after a checkpoint in "
            f"{run_dir / outputs.CHECKPOINTS}; continue with the same command and resume=auto "
            f"hydra.run.dir={run_dir}",
            file=sys.stderr,
            flush=True,
        )
        preempt.chain(exc.signum)
        sys.exit(preempt.exit_code(exc.signum))
    except Exception as exc:
        if dist.is_main:
            with contextlib.suppress(ConfigError):  # a full disk must not hide the first error
                write_json_atomic(
                    run_dir / outputs.FAILURE,
                    {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()},
                )
        if isinstance(exc, ConfigError) and not sweep and not dist.enabled:
            sys.exit(fail(one_line(exc), code=1))
        raise


def rank_worker(cfg, run_dir: Path, resume: Path | None = None) -> None:
    """One of ``recipe.nproc_per_node`` local ranks (a fresh process: see distributed.spawn)."""
    set_environment()

    try:
        run(cfg, run_dir, progress=True, dist=distributed.init_distributed(cfg.recipe.device), resume=resume)
    except Preempted as exc:  # the parent reports it and hands the signal on
        sys.exit(preempt.exit_code(exc.signum))


def check_launch(nproc_per_node: int) -> None:
    """``recipe.nproc_per_node`` starts ranks itself: not inside ranks that a launcher started."""
    if nproc_per_node > 1 and env_world_size() > 1:
        raise ConfigError(
            f"recipe.nproc_per_node={nproc_per_node} under a launcher that already started "
            f"{env_world_size()} ranks (torchrun or SLURM tasks): set recipe.nproc_per_node=1"
        )


def torchrun_rank(args: list[str], overrides: list[str]) -> int:
    """A rank other than 0 under torchrun: no Hydra job (it would make a run directory of its
    own); it joins the group, takes rank 0's config and directory, and trains beside it."""
    cfg = load_config(overrides)
    dist = distributed.init_distributed(cfg.recipe.device)
    cfg, run_dir, job = dist.broadcast(None)
    if job.action != "skip":
        try:
            run(cfg, run_dir, progress=False, dist=dist, resume=job.checkpoint)
        except Preempted as exc:  # rank 0 reports it and hands the signal on
            return preempt.exit_code(exc.signum)
    distributed.destroy()
    return 0


# Hydra's flags that pick what it does (Hydra raises a ValueError on two of them)
_MODE_FLAGS = {"-m": "-m", "--multirun": "-m", "--cfg": "--cfg", "-c": "--cfg", "--info": "--info", "-i": "--info"}
_MODE_FLAGS |= {"--run": "--run", "-r": "--run", "--shell-completion": "-sc", "-sc": "-sc"}


def launch(args: list[str]) -> int:
    """``moe-lora train``: precheck every job's config, then hand over to Hydra (and torchrun ranks)."""
    flags, overrides = split_args(args)
    multirun = "-m" in flags or "--multirun" in flags
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ or (
        "WORLD_SIZE" in os.environ and "SUBMITIT_EXECUTOR" not in os.environ
    )
    modes = [f for f in flags if f in _MODE_FLAGS]
    if len({_MODE_FLAGS[f] for f in modes}) > 1:
        return fail(f"{' and '.join(modes)}: one at a time (a sweep's config: --cfg job with one value per key)")
    if torchrun and env_world_size() > 1 and multirun:
        return fail("torchrun starts one job; for a sweep use `moe-lora train -m ... recipe.nproc_per_node=N`")
    if not any(f in SKIP_PRECHECK for f in flags) and "--cfg" not in flags and "-c" not in flags:
        cfg = precheck(overrides, multirun=multirun)
        if torchrun and env_world_size() > 1:
            check_launch(cfg.recipe.nproc_per_node)
            if int(os.environ.get("RANK", "0")) != 0:
                return torchrun_rank(args, overrides)
    elif SHOW_FLAGS & set(flags) and not CONFIG_SOURCE_FLAGS & set(flags):
        compose(first_job(overrides))  # --help, --cfg, --info: a typo is one line, as for a run
    if multirun and not any(f in SKIP_PRECHECK for f in flags):
        resume = resume_overrides(compose(first_job(overrides), return_hydra_config=True).hydra)
        if resume is not None:
            print(resume.message, flush=True)
            if resume.done:
                return 0
            args = [*args, *resume.overrides]

    sys.argv = ["moe-lora train", *args]
    main_fn = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")(train_job)
    main_fn()

    destroy()
    return 0
