"""Preemption reaches the scheduler: the real signal number survives the ranks' reduction, the
handler installed before for that signal (submitit's, here a stub) is called after the checkpoint;
^C during training checkpoints and exits 130; ^C and SIGTERM outside training end in one line."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moe_lora.train import preempt
from tests.train.forked import in_child
from tests.train.test_checkpoint import kill_after_micro_batch

RUN = ["adapter=lora", "recipe.max_steps=6", "recipe.save_every=5", "recipe.log_every=3", "recipe.threads=1"]


@pytest.fixture
def restored_handlers():
    saved = {s: signal.getsignal(s) for s in preempt.SIGNALS}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_chain_calls_the_handler_installed_before_for_that_exact_signal(restored_handlers) -> None:
    calls: list[tuple[str, int]] = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(("usr2", signum)))
    signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(("term", signum)))
    with preempt.preemption() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop() == signal.SIGUSR2 and calls == []  # only noted inside
    preempt.chain(signal.SIGUSR2)
    assert calls == [("usr2", signal.SIGUSR2)]
    preempt.chain(signal.SIGTERM)
    assert calls == [("usr2", signal.SIGUSR2), ("term", signal.SIGTERM)]
    preempt.chain(signal.SIGINT)  # Python's own ^C handler is not called (it would raise)


def test_a_second_ctrl_c_does_not_wait_for_the_step(restored_handlers) -> None:
    with pytest.raises(preempt.Interrupted), preempt.preemption() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs between bytecodes
            pass


# (each rank's signal, each rank's loss non-finite?) -> (non-finite, signal) on every rank
CASES = [
    (([0, signal.SIGUSR2], [False, False]), (0, signal.SIGUSR2)),  # one rank got it: both stop with it
    (([signal.SIGTERM, signal.SIGTERM], [False, True]), (1, signal.SIGTERM)),  # not 30, not 1
    (([0, 0], [False, False]), (0, 0)),
]


def _flags_worker(out: str) -> None:
    from moe_lora.train import distributed
    from moe_lora.train.loop import LoopIO, _step_flags

    d = distributed.init_distributed("cpu")
    state = SimpleNamespace(optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    scaler, recipe = torch.amp.GradScaler("cpu", enabled=False), SimpleNamespace(max_grad_norm=1.0)
    found = []
    for (signals, bad), _ in CASES:
        sums = torch.tensor([float("nan") if bad[d.rank] else 1.0, 0.0, 1.0])
        io = LoopIO(stop=lambda signals=signals: signals[d.rank], dist=d)
        found.append(list(_step_flags(state, scaler, [], sums, recipe, io)))
    Path(out, f"rank{d.rank}").write_text(json.dumps(found))


def test_two_ranks_agree_on_the_real_signal(tmp_path) -> None:
    from moe_lora.train.distributed import spawn

    spawn(2, _flags_worker, str(tmp_path))
    expected = [[int(v) for v in flags] for _, flags in CASES]
    assert [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)] == [expected, expected]


def _stub_scheduler(sig: int, record: Path) -> Callable[[], None]:
    """What submitit does in a SLURM job: its own handler for the signal (here: note the number)."""

    def arm() -> None:
        signal.signal(sig, lambda signum, frame: record.write_text(str(signum)))
        kill_after_micro_batch(3, sig)()

    return arm


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_a_preempted_run_hands_the_real_signal_to_the_scheduler(sig, cache_dir, tmp_path) -> None:
    run_dir, record, err = tmp_path / "run", tmp_path / "handed", tmp_path / "err"
    assert in_child([*RUN, f"hydra.run.dir={run_dir}"], cache_dir, _stub_scheduler(sig, record), err) == 75
    assert record.read_text() == str(int(sig))
    name = signal.Signals(sig).name
    assert f"moe-lora: stopped by {name} (signal {int(sig)}) after a checkpoint" in err.read_text()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-3"]


def _line(err: Path) -> str:
    """The last thing written to stderr (after progress bars), which must be a single line."""
    text = err.read_text()
    assert "Traceback" not in text, text
    return text.replace("\r", "\n").strip().splitlines()[-1]


def test_ctrl_c_during_training_checkpoints_and_exits_130(cache_dir, tmp_path) -> None:
    run_dir, err = tmp_path / "run", tmp_path / "err"
    assert in_child([*RUN, f"hydra.run.dir={run_dir}"], cache_dir, kill_after_micro_batch(3, signal.SIGINT), err) == 130
    line = _line(err)
    assert line.startswith("moe-lora: stopped by SIGINT (signal 2) after a checkpoint"), line
    assert f"resume=auto hydra.run.dir={run_dir}" in line
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-3"]


def _signal_in_base_evaluation(sig: int) -> Callable[[], None]:
    def arm() -> None:
        from moe_lora.recipes import runner

        original = runner.run_eval

        def run_eval(*args, **kwargs):
            os.kill(os.getpid(), sig)
            return original(*args, **kwargs)

        runner.run_eval = run_eval

    return arm


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_outside_training_ends_in_one_line(sig, code, cache_dir, tmp_path) -> None:
    run_dir, err = tmp_path / "run", tmp_path / "err"
    got = in_child([*RUN, f"hydra.run.dir={run_dir}"], cache_dir, _signal_in_base_evaluation(sig), err)
    assert got == code, err.read_text()[-3000:]
    assert _line(err) == f"moe-lora: interrupted ({signal.Signals(sig).name})"


@pytest.mark.slow
def test_a_signal_to_the_parent_of_local_ranks_reaches_them(cache_dir, tmp_path) -> None:
    """``recipe.nproc_per_node=2``: SIGUSR2 sent to the job's process alone (as ``kill`` or a
    batch-shell-only ``--signal`` does) is passed on to both ranks, which checkpoint; the parent
    hands it to the scheduler's handler."""
    import time

    run_dir, record, err = tmp_path / "run", tmp_path / "handed", tmp_path / "err"
    args = [*RUN, "recipe.nproc_per_node=2", "recipe.max_steps=2000", "recipe.save_every=5000", "recipe.log_every=2"]
    pid = os.fork()
    if pid == 0:  # the job's process; the test sends the signal from outside
        os._exit(in_child([*args, f"hydra.run.dir={run_dir}"], cache_dir, _handler(signal.SIGUSR2, record), err))
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 200
    while time.monotonic() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.05)
    job = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == pid]
    assert len(job) == 1, "the job's process did not start"
    os.kill(job[0], signal.SIGUSR2)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 75, err.read_text()
    assert record.read_text() == str(int(signal.SIGUSR2))
    (step,) = (run_dir / "checkpoints").iterdir()
    assert int(step.name.split("-")[1]) < 2000 and {"rng-rank0.pt", "rng-rank1.pt"} <= set(os.listdir(step))


def _handler(sig: int, record: Path) -> Callable[[], None]:
    def arm() -> None:
        signal.signal(sig, lambda signum, frame: record.write_text(str(signum)))

    return arm


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
