"""Rerunning a sweep into its folder skips finished jobs, resumes checkpointed ones and reruns
failed ones."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.train.test_checkpoint import RUN, _main, killed_at

pytestmark = pytest.mark.slow  # `make test-fast` leaves these out


def _arm_failures() -> None:
    """In the first attempt: job1 fails (a transient error), job2 is killed after step-5."""
    from moe_lora.recipes import job
    from moe_lora.train import checkpoint

    run, save = job.run, checkpoint.save  # job calls the runner's run by the name it imported

    def failing_run(cfg, run_dir, *args, **kwargs):
        if run_dir.name == "job1":
            raise RuntimeError("transient: the file server went away")
        return run(cfg, run_dir, *args, **kwargs)

    def killing_save(run_dir, n, *args, **kwargs):
        path = save(run_dir, n, *args, **kwargs)
        if run_dir.name == "job2" and n == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    job.run, checkpoint.save = failing_run, killing_save


def test_rerun_of_a_sweep_completes_it_without_redoing_finished_jobs(cache_dir, tmp_path, capfd) -> None:
    args = [
        "-m",
        "adapter=lora",
        "seed=0,1,2,3",
        *RUN,
        f"hydra.sweep.dir={tmp_path}",
        "hydra.sweep.subdir=job${hydra.job.num}",
    ]
    assert killed_at(args, cache_dir, _arm_failures) == -signal.SIGKILL
    assert (tmp_path / "job0" / "results.json").exists()
    assert "transient" in json.loads((tmp_path / "job1" / "failure.json").read_text())["error"]
    assert (tmp_path / "job2" / "checkpoints" / "step-5").exists() and not (tmp_path / "job3").exists()
    finished = (tmp_path / "job0" / "results.json").stat().st_mtime_ns
    capfd.readouterr()

    assert _main(["train", *args], cache_dir) == 0
    out = capfd.readouterr().out
    assert (tmp_path / "job0" / "results.json").stat().st_mtime_ns == finished  # not redone
    assert "job0: finished before with this config: skipped" in out
    assert "job1: the earlier attempt failed: rerun" in out
    assert "job2: resuming from step-5" in out
    seeds = [json.loads((tmp_path / f"job{i}" / "results.json").read_text())["seed"] for i in range(4)]
    assert seeds == [0, 1, 2, 3]
    assert not (tmp_path / "job1" / "failure.json").exists()
