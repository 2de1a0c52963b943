"""Optuna studies: the free per-group space, and how a rerun continues a killed study (by hand on
a stored study; the launch itself is in tests/test_launchers.py)."""

from __future__ import annotations

import optuna
import pytest
from omegaconf import OmegaConf

from moe_lora.recipes.studies import OPTUNA, free_weights, resume_overrides


def _hydra(storage: str, n_trials: int = 4, seed: int | None = 0):
    return OmegaConf.create(
        {
            "sweeper": {
                "_target_": OPTUNA,
                "storage": storage,
                "study_name": "s",
                "n_trials": n_trials,
                "sampler": {"seed": seed},
            },
            "sweep": {"dir": "x", "subdir": "${hydra.job.num}_a${a}"},
        }
    )


def _study(storage: str, states: list[str]) -> optuna.Study:
    study = optuna.create_study(study_name="s", storage=storage)
    for i, state in enumerate(states):
        trial = study.ask({"a": optuna.distributions.UniformDistribution(0, 1)})
        if state != "RUNNING":
            study.tell(trial, 0.1 * i if state == "COMPLETE" else None, state=getattr(optuna.trial.TrialState, state))
    return study


def test_a_killed_study_continues_to_n_trials_with_its_interrupted_trial_first(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path}/study.db"
    study = _study(storage, ["COMPLETE", "FAIL", "COMPLETE", "RUNNING"])
    interrupted = study.trials[3].params
    resume = resume_overrides(_hydra(storage, n_trials=5))
    assert resume is not None and not resume.done
    # 2 finished (a genuine failure does not count), 3 to go; folders marked; new draws
    assert resume.overrides == [
        "hydra.sweeper.n_trials=3",
        "hydra.sweep.subdir='r1_${hydra.job.num}_a${a}'",
        "hydra.sweeper.sampler.seed=4",
    ]
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert trials[3].state.name == "FAIL" and trials[4].state.name == "WAITING"
    assert trials[4].system_attrs["fixed_params"] == interrupted
    again = resume_overrides(_hydra(storage, n_trials=5, seed=None))
    assert again.overrides[1].startswith("hydra.sweep.subdir='r2_") and len(again.overrides) == 2


def test_a_complete_study_is_left_alone_and_first_runs_are_untouched(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path}/study.db"
    assert resume_overrides(_hydra(storage)) is None  # no database yet: a first run
    _study(storage, ["COMPLETE", "COMPLETE"])
    done = resume_overrides(_hydra(storage, n_trials=2))
    assert done.done and "nothing to run" in done.message
    assert resume_overrides(OmegaConf.merge(_hydra(storage), {"sweeper": {"study_name": "other"}})) is None
    basic = OmegaConf.create({"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}})
    assert resume_overrides(basic) is None


def test_free_weights_suggests_one_weight_per_group() -> None:
    study = optuna.create_study()
    trial = study.ask()
    free_weights(OmegaConf.create({"layout": {"weights": [1.0, 1.0, 1.0]}}), trial)
    assert sorted(trial.params) == ["layout.weights.0", "layout.weights.1", "layout.weights.2"]
    assert all(0.05 <= v <= 1.0 for v in trial.params.values())
    with pytest.raises(ValueError, match=r"layout\.weights"):
        free_weights(OmegaConf.create({"layout": {"weights": None}}), study.ask())


def test_first_job_keeps_hydra_overrides_and_takes_each_sweeps_first_value() -> None:
    from moe_lora.recipes.compose import first_job

    line = ["adapter=lora,mola", "seed=range(3)", "layout.slope=interval(-1.0, 1.0)", "hydra.sweep.dir=/x"]
    assert first_job(line) == ["adapter=lora", "seed=0", "layout.slope=-1.0", "hydra.sweep.dir=/x"]
