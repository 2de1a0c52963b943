"""Sweep launchers: the SLURM config composes; submitit's local executor runs two jobs."""

from __future__ import annotations

import json
import os
import signal

import pytest
from hydra import compose, initialize_config_dir

from moe_lora.recipes.compose import CONF_DIR


def test_slurm_launcher_config_composes() -> None:
    import moe_lora.adapters  # noqa: F401

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_ and launcher.gpus_per_node == 1 and launcher.timeout_min == 240


@pytest.mark.slow
def test_submitit_local_runs_a_job_of_two_ranks(run_cli, tmp_path) -> None:
    # tasks_per_node=2: the job's two tasks form one process group from submitit's environment
    # (the SLURM path: hydra.launcher.tasks_per_node=N hydra.launcher.nodes=M)
    code, _, err = run_cli(
        "train",
        "-m",
        "hydra/launcher=submitit_local",
        "seed=1",
        "adapter=lora",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.tasks_per_node=2",
        "recipe.threads=1",
    )
    assert code == 0, err
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/results.json"))]
    assert [(r["seed"], r["perf"]["ranks"]) for r in results] == [(1, 2)]


def test_failed_job_does_not_stop_the_sweep_and_is_reported(run_cli, cache_dir, tmp_path) -> None:
    # Config errors stop a sweep before any job starts; a job that fails at run time (here: its
    # cache folder cannot be created) leaves failure.json and the other job goes on.
    import pytest

    from tests.conftest import TINY

    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            "train",
            "-m",
            "adapter=melora",
            "adapter.num_minis=4",
            *TINY,
            f"cache_dir={cache_dir},/proc/moe_lora_no_cache",
            f"hydra.sweep.dir={tmp_path}",
            "hydra.sweep.subdir=job${hydra.job.num}",
            tiny=False,
        )
    assert exit_info.value.code != 0  # the sweep reports the failure...
    assert (tmp_path / "job0" / "results.json").exists()  # ...after the other job ran
    failure = json.loads((tmp_path / "job1" / "failure.json").read_text())
    assert "/proc/moe_lora_no_cache" in failure["error"]
    from moe_lora.report.build import build_report

    index = (build_report([tmp_path]) / "index.md").read_text()
    assert "1 finished runs, 1 failed" in index and "job1" in index, index


@pytest.mark.slow
def test_optuna_sweeper_optimises_the_returned_metric(run_cli, tmp_path) -> None:
    import yaml

    code, _, err = run_cli(
        "train",
        "-m",
        "experiment=optuna_lr",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path}",
        "recipe.max_steps=4",
        "recipe.eval_limit=8",
    )
    assert code == 0, err
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    values = [json.loads(p.read_text())["metrics"]["instruction_em"] for p in tmp_path.glob("*/results.json")]
    assert len(values) == 2 and best["best_value"] == max(values)
    assert set(best["best_params"]) == {"recipe.lr", "adapter.lbc_beta"}


def test_slurm_requeue_resumes_in_the_same_folder() -> None:
    """submitit calls checkpoint() at the time limit (after the loop wrote its checkpoint): the
    requeued job gets resume=auto, so it continues instead of meeting 'holds checkpoints'."""
    import moe_lora.adapters  # noqa: F401
    from moe_lora.recipes.launchers import RequeueSlurmLauncher

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == "moe_lora.recipes.launchers.RequeueSlurmLauncher"
    assert cfg.hydra.launcher.max_num_timeout > 0
    delayed = RequeueSlurmLauncher().checkpoint(["seed=1", "resume=null"], "hydra.sweep.dir", 0, "id", {})
    assert delayed.args[0] == ["seed=1", "resume=auto"] and delayed.args[1:] == ("hydra.sweep.dir", 0, "id", {})


def _kill_at_trial(prefix: str):
    """Arm a forked launch: SIGKILL when the trial folder named ``prefix...`` starts training."""

    def arm() -> None:
        from moe_lora.recipes import job

        run = job.run  # job calls the runner's run by the name it imported

        def killing_run(cfg, run_dir, *args, **kwargs):
            if run_dir.name.startswith(prefix):
                os.kill(os.getpid(), signal.SIGKILL)
            return run(cfg, run_dir, *args, **kwargs)

        job.run = killing_run

    return arm


@pytest.mark.slow
def test_pareto_layout_search_is_killed_resumes_from_its_study_and_reports(run_cli, cache_dir, tmp_path) -> None:
    """NSGA-II over (slope, curvature, budget) with a tuple objective, its study in sqlite in the
    sweep folder: killed during its second trial, the same command completes the study (the
    interrupted trial first, n_trials counted over the study), a third launch has nothing to do,
    and the report draws the front, the allocations and the trials."""
    import optuna

    from moe_lora.report.build import build_report
    from tests.train.test_checkpoint import killed_at

    tmp_path = tmp_path / "sweep"  # not there yet: the study's folder is made for it (sqlite cannot)
    args = [
        "-m",
        "experiment=layout_search_pareto",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.sweeper.sampler.population_size=2",
        "recipe.max_steps=2",
        "recipe.eval_limit=4",
    ]
    assert killed_at(args, cache_dir, _kill_at_trial("1_")) == -signal.SIGKILL

    def trials():
        return optuna.load_study(study_name="layout_search_pareto", storage=f"sqlite:///{tmp_path}/study.db").trials

    assert [t.state.name for t in trials()] == ["COMPLETE", "RUNNING"]
    interrupted = trials()[1].params
    code, out, err = run_cli("train", *args)
    assert code == 0, out + err
    assert "1 finished, 1 interrupted and queued again, 2 to go" in out
    after = trials()
    assert [t.state.name for t in after] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert after[2].params == interrupted and after[3].params != after[0].params  # rerun first; new draws
    assert all(len(t.values) == 3 for t in after if t.values)  # knowledge, instruction EM, trainable
    folders = sorted(p.parent.name for p in tmp_path.glob("*/results.json"))
    assert len(folders) == 3 and folders[0].startswith("0_") and all(f.startswith("r1_") for f in folders[1:])
    code, out, err = run_cli("train", *args)
    assert code == 0 and "nothing to run" in out and len(trials()) == 4
    results = [json.loads(p.read_text()) for p in tmp_path.glob("*/results.json")]
    means = {r["config"]["layout"]["budget"]["per_layer_mean"] for r in results}
    assert all(
        sum(r["budget"]["experts_per_layer"]) == 2 * r["config"]["layout"]["budget"]["per_layer_mean"] for r in results
    ) and means <= {3, 5, 8}  # every trial spent its budget (2 layers)
    out = build_report([tmp_path])
    for name in ("search.md", "pareto.png", "allocation_heatmap.png"):
        assert (out / name).exists(), name
