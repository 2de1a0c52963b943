"""outputs: a folder appears whole or not at all (atomic_dir); run folders are reused only when
moe-lora made them and no live job holds their lock; a report replaces only a report."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from moe_lora import outputs
from moe_lora.outputs import atomic_dir


def _write(folder: Path, text: str) -> None:
    (folder / "a.txt").write_text(text)


def test_new_and_replaced_folders_appear_whole(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "out"
    with atomic_dir(final) as tmp:
        _write(tmp, "one")
        assert not final.exists() and tmp.parent == final.parent
    assert (final / "a.txt").read_text() == "one"
    with atomic_dir(final) as tmp:
        _write(tmp, "two")
    assert (final / "a.txt").read_text() == "two"
    assert sorted(p.name for p in final.parent.iterdir()) == ["out"]  # no temporary or old folder left


def test_a_failed_write_leaves_the_previous_folder(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        _write(tmp, "one")
    with pytest.raises(RuntimeError), atomic_dir(final, tmp_path / ".fixed") as tmp:
        _write(tmp, "half")
        raise RuntimeError("disk full")
    assert (final / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_keep_existing_keeps_the_first_writer(tmp_path: Path) -> None:
    final = tmp_path / "cache"
    with atomic_dir(final, keep_existing=True) as tmp:
        _write(tmp, "first")
        with atomic_dir(final, keep_existing=True) as other:  # a concurrent job finishes first
            _write(other, "second")
    assert (final / "a.txt").read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


# ------------------------------------------------------------------------------------ run folders
def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


MOE_LORA_CONFIG = "seed: 0\nmodel: {}\nadapter: {}\nlayout: {}\ndata: {}\nrecipe: {max_steps: 3}\n"


@pytest.mark.parametrize(
    ("files", "ours"),
    [
        ({}, True),  # empty
        ({".hydra/config.yaml": "x: 1", "train.log": ""}, True),  # what Hydra makes before the job
        ({outputs.RUN_MARKER: '{"moe_lora": "0.1.0"}', "config.yaml": "x: 1"}, True),
        ({"config.yaml": MOE_LORA_CONFIG, "metrics.jsonl": ""}, True),  # an old run, killed early
        ({"results.json": '{"adapter": "lora", "metrics": {}}'}, True),
        ({"checkpoints/step-5/checkpoint.json": '{"step": 5, "config_hash": "0"}'}, True),
        ({"failure.json": '{"error": "E", "traceback": "T"}'}, True),
        ({"config.yaml": "lr: 0.1\n", "metrics.jsonl": '{"loss": 1}\n'}, False),  # another program's run
        ({"metrics.jsonl": ""}, False),
        ({outputs.RUN_MARKER: "not json", "notes.txt": "mine"}, False),
        ({"checkpoints/step-5/model.bin": "weights"}, False),
        ({"results.json": '{"accuracy": 0.5}'}, False),
    ],
)
def test_which_run_folders_moe_lora_may_reuse(tmp_path: Path, files: dict[str, str], ours: bool) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = _snapshot(tmp_path)
    if ours:
        outputs.check_run_folder(tmp_path)
    else:
        with pytest.raises(outputs.RunFolderError, match=f"run folder {tmp_path} holds files moe-lora did not write"):
            outputs.check_run_folder(tmp_path)
    assert _snapshot(tmp_path) == before


def _held_by_child(run_dir: Path) -> tuple[int, int]:
    """A forked process holding ``run_dir`` until its stdin pipe closes: (pid, write end)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(go_w)  # the parent's close must reach the read below as end of file
            with outputs.run_folder(run_dir):
                os.write(ready_w, b"x")
                os.read(go_r, 1)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    for fd in (go_r, ready_w):
        os.close(fd)
    ready = os.read(ready_r, 1)
    os.close(ready_r)
    assert ready == b"x", "the child could not take the lock"
    return pid, go_w


def test_a_held_run_folder_is_refused_with_its_holder_and_freed_after(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pid, go = _held_by_child(run_dir)
    try:
        holder = json.loads((run_dir / outputs.RUN_LOCK).read_text())
        assert holder["pid"] == pid and holder["host"] == socket.gethostname()
        before = _snapshot(tmp_path)
        expected = f"run folder {run_dir} is in use by pid {pid} on host {socket.gethostname()}"
        with pytest.raises(outputs.RunFolderError, match=expected):
            outputs.check_not_live(run_dir)
        with pytest.raises(outputs.RunFolderError, match=expected), outputs.run_folder(run_dir):
            pass
        assert _snapshot(tmp_path) == before
    finally:
        os.close(go)
        _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert sorted(p.name for p in run_dir.iterdir()) == [outputs.RUN_MARKER]  # the lock file goes with its holder
    assert json.loads((run_dir / outputs.RUN_MARKER).read_text())["moe_lora"]
    outputs.check_not_live(run_dir)
    with outputs.run_folder(run_dir):
        outputs.check_not_live(run_dir)  # this process's own lock passes its own check


def test_a_dead_holders_lock_file_blocks_nothing_and_an_error_releases(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / outputs.RUN_LOCK).write_text('{"pid": 999999999, "host": "gone"}\n')  # left by a SIGKILL
    outputs.check_not_live(run_dir)
    with pytest.raises(RuntimeError, match="boom"), outputs.run_folder(run_dir):
        raise RuntimeError("boom")
    assert not (run_dir / outputs.RUN_LOCK).exists()
    with outputs.run_folder(run_dir):
        assert json.loads((run_dir / outputs.RUN_LOCK).read_text())["pid"] == os.getpid()


def test_a_foreign_folder_is_refused_before_its_lock_is_made(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("lr: 0.1\n")
    with pytest.raises(outputs.RunFolderError, match="did not write"), outputs.run_folder(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


# ------------------------------------------------------------------------------------ report folders
@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for job in ("0_lora", "1_lora"):
        (tmp_path / "sweep" / job).mkdir(parents=True)
        (tmp_path / "sweep" / job / "results.json").write_text('{"adapter": "lora", "metrics": {}}')
        (tmp_path / "sweep" / job / "adapter_model.safetensors").write_bytes(b"tensors")
    return tmp_path / "sweep"


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("sweep", "is or contains"),
        (".", "is or contains"),
        ("sweep/0_lora", "is a run folder"),
        ("sweep/0_lora/checkpoints", "lies inside the run folder"),
        ("notes", "holds files the report did not write"),
        ("notes/file.txt", "is a file"),
        ("oldrep", "contains the run folder"),
    ],
)
def test_report_out_that_would_lose_files_is_refused(sweep: Path, out: str, message: str) -> None:
    root = sweep.parent
    (root / "notes").mkdir()
    (root / "notes" / "file.txt").write_text("mine")
    (root / "oldrep" / "run").mkdir(parents=True)  # a report folder someone moved a run into
    (root / "oldrep" / outputs.REPORT_MARKER).write_text("{}")
    (root / "oldrep" / "run" / "results.json").write_text("{}")
    before = _snapshot(root)
    with pytest.raises(outputs.ConfigError, match=message):
        outputs.check_report_folder(root / out, [sweep])
    assert _snapshot(root) == before


def test_report_out_may_be_new_empty_or_a_report(sweep: Path) -> None:
    root = sweep.parent
    (root / "empty").mkdir()
    (root / "marked").mkdir()
    (root / "marked" / outputs.REPORT_MARKER).write_text("{}")
    (root / "old").mkdir()  # a report made before the marker
    for name in ("index.md", "results.csv", "claims.json", "cv_over_training.png"):
        (root / "old" / name).write_text("x")
    for out in ("new/rep", "empty", "marked", "old", "sweep/report", "sweep/reports/v2", "sweep/0_lora/report"):
        outputs.check_report_folder(root / out, [sweep])


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    import errno
    import fcntl

    def no_locks(fd: int, how: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with outputs.run_folder(tmp_path / "run"):
        outputs.check_not_live(tmp_path / "run")
    assert "cannot be locked (No locks available)" in caplog.text
