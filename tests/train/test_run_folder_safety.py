"""Never delete what moe-lora did not make, never share a live run's folder: through the CLI,
`report --out` onto a sweep or a run is refused and the folder left intact; a run folder holding
another program's files is refused untouched; a second `moe-lora train` on a live run's folder
fails in one line naming the holder while the first finishes unharmed; an old run folder (no
marker, a lock file left by a SIGKILL) still resumes and reports."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from moe_lora import outputs
from tests.report.test_report import fake_run
from tests.test_outputs import _held_by_child, _snapshot
from tests.train.test_checkpoint import _main, kill_after_checkpoint, killed_at

RUN = ["recipe.max_steps=6", "recipe.save_every=3", "recipe.log_every=2", "recipe.threads=1"]


def _one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-lora: error: "), err[-3000:]
    assert all(n in lines[0] for n in needles), lines[0]


# ------------------------------------------------------------------------------------ report --out
@pytest.mark.parametrize("target", ["sweep", "run", "parent"])
def test_report_out_onto_a_sweep_or_a_run_is_refused_and_intact(run_cli, tmp_path: Path, target: str) -> None:
    sweep = tmp_path / "sweep"
    for i in range(2):
        fake_run(sweep / f"{i}_lora", "lora", i, 0.5, 0.5, 0.0)
        (sweep / f"{i}_lora" / outputs.ADAPTER).write_bytes(b"adapter tensors")
    out = {"sweep": sweep, "run": sweep / "0_lora", "parent": tmp_path}[target]
    before = _snapshot(tmp_path)
    code, _, err = run_cli("report", str(sweep), "--out", str(out), tiny=False)
    assert code == 2
    _one_error_line(err, f"report --out {out}")
    assert _snapshot(tmp_path) == before
    code, _, err = run_cli("report", str(sweep), tiny=False)  # the default place still works
    assert code == 0 and (sweep / "report" / outputs.REPORT_MARKER).exists(), err
    code, _, err = run_cli("report", str(sweep), "--out", str(sweep / "report"), tiny=False)  # and again
    assert code == 0, err


# ------------------------------------------------------------------------------------ foreign folders
@pytest.mark.parametrize("extra", [[], ["resume=auto"]])
def test_a_run_folder_with_foreign_files_is_refused_untouched(run_cli, tmp_path: Path, extra: list[str]) -> None:
    run_dir = tmp_path / "theirs"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("optimizer: adamw\nlr: 0.001\n")  # another program's run
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    before = _snapshot(tmp_path)
    code, _, err = run_cli("train", "adapter=lora", *extra, f"hydra.run.dir={run_dir}")
    assert code == 2
    _one_error_line(err, f"run folder {run_dir} holds files moe-lora did not write", "config.yaml")
    assert _snapshot(tmp_path) == before


def test_a_sweep_job_folder_with_foreign_files_is_never_emptied(run_cli, tmp_path: Path, capsys) -> None:
    """A sweep checks each job's folder inside the job (Hydra has made its .hydra there by then):
    the sweep stops there in one line, and the files stay."""
    job0 = tmp_path / "job0"
    job0.mkdir()
    (job0 / "config.yaml").write_text("lr: 0.001\n")
    (job0 / "metrics.jsonl").write_text('{"loss": 2.5}\n')
    with pytest.raises(SystemExit) as info:
        run_cli(
            "train",
            "-m",
            "adapter=lora",
            "seed=0",
            f"hydra.sweep.dir={tmp_path}",
            "hydra.sweep.subdir=job${hydra.job.num}",
        )
    assert info.value.code == 2
    _one_error_line(capsys.readouterr().err, f"run folder {job0} holds files moe-lora did not write")
    assert (job0 / "config.yaml").read_text() == "lr: 0.001\n" and (
        job0 / "metrics.jsonl"
    ).read_text() == '{"loss": 2.5}\n'
    assert not (job0 / "results.json").exists() and not (job0 / outputs.RUN_MARKER).exists()


# ------------------------------------------------------------------------------------ the lock
def test_a_live_run_folder_is_refused_before_anything_is_written(run_cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pid, go = _held_by_child(run_dir)
    try:
        before = _snapshot(tmp_path)
        code, _, err = run_cli("train", "adapter=lora", "resume=auto", f"hydra.run.dir={run_dir}")
        assert code == 2
        _one_error_line(err, f"run folder {run_dir} is in use by pid {pid} on host {socket.gethostname()}")
        assert _snapshot(tmp_path) == before
    finally:
        os.close(go)
        os.waitpid(pid, 0)


def paused_after_checkpoint(step: int, ready: int, go: int) -> Callable[[], None]:
    """In the forked first run: after ``checkpoints/step-<step>`` tell the test (``ready``) and wait
    for it (``go``) before training on."""

    def arm() -> None:
        from moe_lora.train import checkpoint

        original = checkpoint.save

        def save(run_dir, n, *args, **kwargs):
            path = original(run_dir, n, *args, **kwargs)
            if n == step:
                os.write(ready, b"x")
                os.read(go, 1)
            return path

        checkpoint.save = save

    return arm


@pytest.mark.slow
def test_a_second_train_on_a_live_run_fails_in_one_line_and_the_first_finishes(
    run_cli, cache_dir, tmp_path: Path, monkeypatch, capsys
) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "adapter=lora", *RUN, f"hydra.run.dir={run_dir}"]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the first run, paused mid-training; never returns into pytest
        code = 1
        try:
            os.close(go_w)
            os.close(ready_r)
            paused_after_checkpoint(3, ready_w, go_r)()
            code = _main(args, cache_dir)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x", "the first run ended before its checkpoint"
        holder = f"run folder {run_dir} is in use by pid {pid} on host {socket.gethostname()}"
        before = _snapshot(run_dir)
        code, _, err = run_cli(*args, "resume=auto")  # caught before Hydra starts
        assert code == 2
        _one_error_line(err, holder)
        assert _snapshot(run_dir) == before
        # a second run that got past that check (started in the same instant) loses the lock in the job
        monkeypatch.setattr(outputs, "check_not_live", lambda run_dir: None)
        with pytest.raises(SystemExit) as info:
            run_cli(*args, "resume=auto")
        assert info.value.code == 2
        _one_error_line(capsys.readouterr().err, holder)
    finally:
        os.close(go_w)  # the first run trains on
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    steps = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 6, steps  # one run's loss lines, none twice
    assert (run_dir / "results.json").exists() and not (run_dir / outputs.RUN_LOCK).exists()


# ------------------------------------------------------------------------------------ old folders
@pytest.mark.slow
def test_an_old_run_folder_without_the_marker_resumes_and_reports(run_cli, cache_dir, tmp_path: Path) -> None:
    run_dir = tmp_path / "sweep" / "run"
    args = ["adapter=lora", *RUN, f"hydra.run.dir={run_dir}"]
    assert killed_at(args, cache_dir, kill_after_checkpoint(3)) == -signal.SIGKILL
    lock = json.loads((run_dir / outputs.RUN_LOCK).read_text())  # left by the SIGKILL, naming a dead pid
    with pytest.raises(ProcessLookupError):
        os.kill(lock["pid"], 0)
    (run_dir / outputs.RUN_MARKER).unlink()  # as a folder written before the marker existed
    assert _main(["train", *args, "resume=auto"], cache_dir) == 0
    assert (run_dir / "results.json").exists() and (run_dir / outputs.RUN_MARKER).exists()
    assert not (run_dir / outputs.RUN_LOCK).exists()
    (run_dir / outputs.RUN_MARKER).unlink()
    code, _, err = run_cli("report", str(run_dir.parent), tiny=False)
    assert code == 0 and "1 finished runs" in (run_dir.parent / "report" / "index.md").read_text(), err
