"""Optuna studies of ``moe-lora train -m``: the free per-group search space, and resuming a killed
search from the study in its sweep folder.

Hydra's Optuna sweeper (1.2, on optuna 2.x) reopens a stored study (``load_if_exists``) but then runs
``n_trials`` *more* trials with a sampler seeded as in the first run, so a rerun after a kill
repeats the first trials' parameters and the killed trial stays RUNNING for ever. Before Hydra
starts, :func:`resume_overrides` reads the study and makes the rerun continue it instead:

- a RUNNING trial is from the killed sweep (this assumes no other process runs the study at the
  same time): it is marked FAIL and its parameters are queued again, so it is rerun first;
- ``hydra.sweeper.n_trials`` counts the study's finished (complete or pruned) trials: rerunning the
  same command completes the search, a larger ``n_trials`` extends it, and a complete study is left
  as it is;
- the sampler's seed is offset by the number of trials so far, so new draws differ from old ones
  and the resumed search is still reproducible;
- the resumed trials' folders are prefixed ``r<k>_`` (Hydra numbers a sweep's jobs from 0 again),
  so no folder of the first run is reused or overwritten.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
FREE_WEIGHT_RANGE = (0.05, 1.0)  # a group's weight: at most 20x another's; the projection normalises


def free_weights(cfg: DictConfig, trial) -> None:
    """``hydra.sweeper.custom_search_space``: one free weight per group of ``layout.weights``
    (the free per-group space: any allocation of the budget over the groups, not only smooth
    depth profiles). The weights are scale-free, since the projection spends the budget exactly
    whatever their sum, so a box of weights covers every point of the simplex."""
    weights = OmegaConf.select(cfg, "layout.weights")
    if not weights:
        raise ValueError("custom_search_space free_weights needs layout.weights (one entry per group)")
    for i in range(len(weights)):
        trial.suggest_float(f"layout.weights.{i}", *FREE_WEIGHT_RANGE)


@dataclass(frozen=True)
class Resume:
    """What a rerun of a stored study does: the overrides it adds, and a line saying so."""

    overrides: list[str]
    message: str
    done: bool = False  # the study already has n_trials finished trials: nothing to launch


def sqlite_path(storage: str | None) -> Path | None:
    prefix = "sqlite:///"
    return Path(storage[len(prefix) :]) if storage and storage.startswith(prefix) else None


def resume_overrides(hydra_cfg: DictConfig) -> Resume | None:
    """For a multirun whose Optuna study already exists in sqlite: how to continue it (None for
    any other sweep, or a first run). ``hydra_cfg`` is the composed ``hydra`` node."""
    sweeper = hydra_cfg.sweeper
    if OmegaConf.select(sweeper, "_target_") != OPTUNA:
        return None
    storage = OmegaConf.select(sweeper, "storage")
    path = sqlite_path(storage)
    if path is None or not path.exists():
        return None
    import optuna
    from optuna.trial import TrialState

    name = sweeper.study_name
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # the database holds other studies, not this one: a first run
        return None
    trials = study.get_trials(deepcopy=False)
    stale = [t for t in trials if t.state == TrialState.RUNNING]
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        with warnings.catch_warnings():  # optuna 2.x calls enqueue_trial experimental; it is stable in 3.x
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.enqueue_trial(dict(t.params))
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    to_go = max(0, int(sweeper.n_trials) - finished)
    if to_go == 0:
        return Resume(
            [],
            f"study {name!r} has {finished} finished trials of n_trials={sweeper.n_trials}: "
            "nothing to run (raise hydra.sweeper.n_trials to extend it)",
            done=True,
        )
    k = int(study.user_attrs.get("resumes", 0)) + 1
    study.set_user_attr("resumes", k)
    subdir = OmegaConf.to_container(hydra_cfg.sweep, resolve=False)["subdir"]
    overrides = [f"hydra.sweeper.n_trials={to_go}", f"hydra.sweep.subdir='r{k}_{subdir}'"]
    seed = OmegaConf.select(sweeper, "sampler.seed")
    if seed is not None:
        overrides.append(f"hydra.sweeper.sampler.seed={int(seed) + len(trials)}")
    message = (
        f"resuming study {name!r} ({path}): {finished} finished, {len(stale)} interrupted and queued "
        f"again, {to_go} to go of n_trials={sweeper.n_trials}"
    )
    return Resume(overrides, message)
