"""Checkpoints and resume: SIGKILL at seeded points, then resume, ends bitwise where an
uninterrupted run ends (adapter tensors, `loss` lines and routing.jsonl byte for byte).

Kills happen in a forked copy of the test process (no re-import: a run costs ~2 s, not ~6 s) that
SIGKILLs itself at the chosen point; the resume and the reference run in-process through the CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import TINY

pytestmark = pytest.mark.slow  # `make test-fast` leaves these out

RUN = ["recipe.max_steps=12", "recipe.save_every=5", "recipe.log_every=3", "recipe.threads=1"]


def _main(args: list[str], cache_dir: Path) -> int:
    from moe_lora.cli import main

    return main([*args, *TINY, f"cache_dir={cache_dir}"])


def killed_at(args: list[str], cache_dir: Path, arm: Callable[[], None], sig: int = signal.SIGKILL) -> int:
    """Run ``moe-lora train args`` in a forked child in which ``arm()`` has installed the kill
    point; returns the child's exit status (negative: the signal that ended it)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            arm()
            code = _main(["train", *args], cache_dir)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def kill_after_micro_batch(n: int, sig: int = signal.SIGKILL) -> Callable[[], None]:
    """Kill when the n-th micro-batch of the run has been recorded (mid-step, any step)."""

    def arm() -> None:
        from moe_lora.routing.recorder import RoutingRecorder

        original, count = RoutingRecorder.pop_aux_loss, [0]

        def pop(self):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), sig)
            return original(self)

        RoutingRecorder.pop_aux_loss = pop

    return arm


def kill_after_checkpoint(step: int) -> Callable[[], None]:
    """Kill just after ``checkpoints/step-<step>`` has appeared."""

    def arm() -> None:
        from moe_lora.train import checkpoint

        original = checkpoint.save

        def save(run_dir, n, *args, **kwargs):
            path = original(run_dir, n, *args, **kwargs)
            if n == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        checkpoint.save = save

    return arm


def kill_during_write(step: int) -> Callable[[], None]:
    """Kill inside the write of ``step-<step>``: the adapter file is in the temporary folder,
    the optimizer state not yet."""

    def arm() -> None:
        from moe_lora.train import checkpoint

        original = checkpoint.save_file

        def save_file(tensors, path):
            original(tensors, path)
            if f".tmp-step-{step}" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.save_file = save_file

    return arm


def loss_lines(run_dir: Path) -> list[str]:
    return [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def assert_same_end(run_dir: Path, reference: Path) -> None:
    from moe_lora.recipes.runner import ADAPTER_FILE

    assert (run_dir / ADAPTER_FILE).read_bytes() == (reference / ADAPTER_FILE).read_bytes()
    assert loss_lines(run_dir) == loss_lines(reference)
    assert (run_dir / "routing.jsonl").read_bytes() == (reference / "routing.jsonl").read_bytes()


@pytest.fixture(scope="module")
def references(tmp_path_factory, cache_dir) -> Callable[[str, tuple[str, ...]], Path]:
    """Uninterrupted runs, one per (adapter, extra overrides), made once."""
    made: dict[tuple, Path] = {}

    def get(adapter: str, extra: tuple[str, ...] = ()) -> Path:
        key = (adapter, extra)
        if key not in made:
            run_dir = tmp_path_factory.mktemp(f"ref_{adapter}") / "run"
            assert _main(["train", f"adapter={adapter}", *RUN, *extra, f"hydra.run.dir={run_dir}"], cache_dir) == 0
            made[key] = run_dir
        return made[key]

    return get


POINTS = {
    "just after step-5 appears": kill_after_checkpoint(5),
    "between a save and the next log line": kill_after_micro_batch(6),  # saved at 5, killed in step 6 before its log
    "during the write of step-10": kill_during_write(10),
}


@pytest.mark.parametrize("adapter", ["loramoe", "mola"])
@pytest.mark.parametrize("point", list(POINTS))
def test_killed_and_resumed_ends_bitwise_equal(adapter, point, references, cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = [f"adapter={adapter}", *RUN, f"hydra.run.dir={run_dir}"]
    assert killed_at(args, cache_dir, POINTS[point]) == -signal.SIGKILL
    assert not (run_dir / "results.json").exists()
    assert _main(["train", *args, f"resume={run_dir}"], cache_dir) == 0
    assert_same_end(run_dir, references(adapter))
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # a half-written checkpoint is removed


@pytest.mark.parametrize("adapter", ["lora", "adamoe", "hydralora"])
def test_other_variants_resume_bitwise(adapter, references, cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = [f"adapter={adapter}", *RUN, f"hydra.run.dir={run_dir}"]
    assert killed_at(args, cache_dir, kill_after_micro_batch(8)) == -signal.SIGKILL
    assert _main(["train", *args, "resume=auto"], cache_dir) == 0
    assert_same_end(run_dir, references(adapter))


def test_alora_killed_after_a_reallocation_resumes_to_the_same_ranks(references, cache_dir, tmp_path) -> None:
    extra = ("recipe.realloc_every=4",)  # reallocations after steps 4 and 8; checkpoint at 5
    run_dir = tmp_path / "run"
    args = ["adapter=alora", *RUN, *extra, f"hydra.run.dir={run_dir}"]
    assert killed_at(args, cache_dir, kill_after_micro_batch(7)) == -signal.SIGKILL
    assert _main(["train", *args, f"resume={run_dir}"], cache_dir) == 0
    reference = references("alora", extra)
    assert_same_end(run_dir, reference)
    ranks = [json.loads((d / "results.json").read_text())["adapter_report"] for d in (run_dir, reference)]
    assert ranks[0] == ranks[1]
    realloc = [line for line in (reference / "metrics.jsonl").read_text().splitlines() if "alora_pruned" in line]
    assert len(realloc) == 2 and realloc == [
        line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "alora_pruned" in line
    ]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_then_resumes_bitwise(sig, code, references, cache_dir, tmp_path) -> None:
    """SIGTERM (a scheduler) and ^C alike: the step finishes, a checkpoint is written, and the resumed
    run ends bitwise where the uninterrupted one does."""
    run_dir = tmp_path / "run"
    args = ["adapter=loramoe", *RUN, f"hydra.run.dir={run_dir}"]
    assert killed_at(args, cache_dir, kill_after_micro_batch(3, sig)) == code
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-3"]  # the step finished, then saved
    assert _main(["train", *args, f"resume={run_dir}"], cache_dir) == 0
    assert_same_end(run_dir, references("loramoe"))


def test_cli_sigkill_once_step_14_exists_then_resume(cache_dir, tmp_path) -> None:
    """The issue's command, as a user runs it: a real process, killed from outside."""
    import time

    steps = ["adapter=loramoe", "recipe.max_steps=24", "recipe.save_every=7", "recipe.log_every=5", "recipe.threads=1"]
    cmd = [sys.executable, "-m", "moe_lora", "train", *steps, *TINY, f"cache_dir={cache_dir}"]
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert _main(["train", *steps, f"hydra.run.dir={reference}"], cache_dir) == 0  # in-process: same numbers
    proc = subprocess.Popen([*cmd, f"hydra.run.dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "step-14").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (run_dir / "results.json").exists(), "the run finished before it could be killed"
    assert _main(["train", *steps, f"resume={run_dir}", f"hydra.run.dir={run_dir}"], cache_dir) == 0
    assert_same_end(run_dir, reference)


# ----------------------------------------------------------------------------------- bad resumes
@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, cache_dir) -> Path:
    """A run killed after its step-5 checkpoint (read-only use: tests copy it)."""
    run_dir = tmp_path_factory.mktemp("checkpointed") / "run"
    args = ["adapter=loramoe", *RUN, f"hydra.run.dir={run_dir}"]
    assert killed_at(args, cache_dir, kill_after_checkpoint(5)) == -signal.SIGKILL
    return run_dir


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "holds checkpoints (step-5): continue it with resume="),
        (["resume=auto", "recipe.lr=0.01"], "config differs from the checkpointed run's in recipe.lr"),
        (["resume=auto", "adapter.num_experts=4"], "adapter.num_experts"),
        (["resume=/elsewhere"], "a run resumes in its own directory"),
    ],
)
def test_bad_resume_fails_in_one_line_and_touches_nothing(extra, message, checkpointed, run_cli, tmp_path) -> None:
    run_dir = _copy(checkpointed, tmp_path / "run")
    before = _snapshot(run_dir)
    code, _, err = run_cli("train", "adapter=loramoe", *RUN, *extra, f"hydra.run.dir={run_dir}")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(run_dir) == before


def test_truncated_checkpoint_is_named_before_anything_starts(checkpointed, run_cli, tmp_path) -> None:
    run_dir = _copy(checkpointed, tmp_path / "run")
    optimizer = run_dir / "checkpoints" / "step-5" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    before = _snapshot(run_dir)
    code, _, err = run_cli("train", "adapter=loramoe", *RUN, f"resume={run_dir}", f"hydra.run.dir={run_dir}")
    assert code == 2 and f"checkpoint file {optimizer} is truncated" in err, err
    assert _snapshot(run_dir) == before


def test_corrupt_checkpoint_is_named(checkpointed, run_cli, capsys, tmp_path) -> None:
    run_dir = _copy(checkpointed, tmp_path / "run")
    optimizer = run_dir / "checkpoints" / "step-5" / "optimizer.pt"
    optimizer.write_bytes(bytes(len(optimizer.read_bytes())))  # same size, garbage: its SHA-256 differs
    before = _snapshot(run_dir)
    try:
        code, _, err = run_cli("train", "adapter=loramoe", *RUN, f"resume={run_dir}", f"hydra.run.dir={run_dir}")
    except SystemExit as exc:
        code, err = exc.code, capsys.readouterr().err
    assert code == 2 and f"checkpoint file {optimizer} is damaged" in err, err
    assert _snapshot(run_dir) == before  # named before anything starts; left for the user to look at


def test_keep_checkpoints_and_stale_temporary_folders(cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ".tmp-step-99").mkdir(parents=True)
    # resume=auto on a directory without checkpoints starts fresh
    assert (
        _main(
            [
                "train",
                "adapter=lora",
                *RUN,
                "recipe.save_every=2",
                "recipe.keep_checkpoints=3",
                "resume=auto",
                f"hydra.run.dir={run_dir}",
            ],
            cache_dir,
        )
        == 0
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-10", "step-12", "step-8"]


def test_a_real_checkpoint_resumes_bitwise(checkpoints, data_root, cache_dir, tmp_path) -> None:
    """Qwen2 (bf16 base, bf16 autocast, float32 adapters) with MoLA on fixture TriviaQA + Alpaca."""
    real = [
        "model=qwen2_5_0_5b",
        f"model.name_or_path={checkpoints['qwen2']}",
        "adapter=mola",
        "data=triviaqa_alpaca",
        f"data.root={data_root}",
        "data.num_train=48",
        "data.max_length=96",
        "eval.max_new_tokens=8",
        "recipe.eval_limit=4",
        *RUN,
    ]
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert _main(["train", *real, f"hydra.run.dir={reference}"], cache_dir) == 0
    assert killed_at([*real, f"hydra.run.dir={run_dir}"], cache_dir, kill_after_micro_batch(8)) == -signal.SIGKILL
    assert _main(["train", *real, f"hydra.run.dir={run_dir}", "resume=auto"], cache_dir) == 0
    assert_same_end(run_dir, reference)


def test_a_t5_killed_mid_training_resumes_bitwise(references, cache_dir, tmp_path, tmp_path_factory) -> None:
    """An encoder-decoder (tiny T5 with dropout, MoV, P3 files, per-sequence loss) killed in step 8
    resumes to the uninterrupted run's bytes."""
    from tests.fixtures.checkpoints import make_t5_checkpoint
    from tests.fixtures.p3 import write_p3_root

    root = tmp_path_factory.mktemp("t5_kill")
    t5 = make_t5_checkpoint(root / "t5", encoder_layers=1, decoder_layers=2)
    extra = (
        "model.source=hub",
        f"model.name_or_path={t5}",
        "data=p3_t0",
        f"data.root={write_p3_root(root / 'p3')}",
        "data.p3.train_datasets=[ag_news,imdb]",
        "data.p3.eval_datasets=[super_glue_rte]",
        "data.max_source_length=64",
        "data.max_target_length=8",
        "recipe.loss_normalization=sequence",
    )
    run_dir = tmp_path / "run"
    args = ["adapter=mov", *RUN, *extra, f"hydra.run.dir={run_dir}"]
    assert killed_at(args, cache_dir, kill_after_micro_batch(8)) == -signal.SIGKILL
    assert _main(["train", *args, "resume=auto"], cache_dir) == 0
    assert_same_end(run_dir, references("mov", extra))
