"""Help that works: every command's --help, Hydra's own --help / --cfg / --info on `train` (the
schemas registered first), and runs and sweeps that end by printing the command reporting them."""

from __future__ import annotations

import logging
import shlex

import pytest

from moe_lora.cli import COMMANDS


@pytest.fixture(autouse=True)
def keep_logging():
    """Hydra (--help, --cfg, --info) configures logging onto a test's captured stdout, closed after
    it: put logging back as it was after each test."""
    loggers = [logging.root, *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    saved = [(x, x.handlers[:], x.level, x.disabled, x.propagate) for x in loggers]
    yield
    for logger, handlers, level, disabled, propagate in saved:
        logger.handlers[:], logger.level, logger.disabled, logger.propagate = handlers, level, disabled, propagate
    for name in set(logging.Logger.manager.loggerDict) - {x.name for x in loggers}:
        added = logging.getLogger(name)
        added.handlers[:], added.disabled = [], False


@pytest.fixture
def cli(run_cli, capsys):
    """``run_cli`` that also returns when the command exits (argparse's and Hydra's --help call
    ``sys.exit``: the console script's exit status)."""

    def _run(*args: str, tiny: bool = False) -> tuple[int, str, str]:
        try:
            return run_cli(*args, tiny=tiny)
        except SystemExit as exc:
            return exc.code, *capsys.readouterr()

    return _run


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(cli, command) -> None:
    for flag in ("--help", "-h") if command == "params" else ("--help",):
        code, out, err = cli(command, flag)
        assert code == 0 and "usage" in out.lower() and f"moe-lora {command}" in out, (out, err)
        assert "trainable:" not in out  # `params --help` used to print the parameter table


def test_train_help_lists_groups_keys_and_defaults(cli) -> None:
    code, out, err = cli("train", "-h", "adapter=mola")
    assert code == 0 and not err, err
    assert "adapter: adamoe, alora" in out and "layout: custom, diamond" in out  # groups and options
    assert "name: mola" in out and "num_experts:" in out and "max_steps:" in out  # keys with defaults
    assert "moe-lora report" in out and "--cfg job" in out


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--cfg", "job", "adapter=lora"], ["adapter:\n  name: lora", "recipe:"]),
        (["-c", "job", "-p", "adapter", "adapter=mola"], ["name: mola"]),
        (["--cfg", "hydra"], ["hydra:", "sweep_end"]),
        (["--cfg", "all", "--resolve", "hydra.run.dir=somewhere"], ["dir: somewhere", "adapter:"]),
        (["--info", "defaults"], ["Defaults List", "adapter/loramoe"]),
    ],
)
def test_hydra_show_flags_print_the_config(cli, caplog, flags, needles) -> None:
    code, out, err = cli("train", *flags)
    out += caplog.text  # --info writes through Hydra's logging (to stdout, outside pytest)
    assert code == 0 and "error" not in err, err
    assert all(n in out for n in needles), out[:2000]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cfg", "job", "adapter.num_expert=4"], "did you mean adapter.num_experts?"),
        (["--help", "arm=lora"], "add it with +arm=lora"),
        (["--cfg", "job", "-m", "adapter=lora,mola"], "one at a time"),
    ],
)
def test_show_flags_keep_one_line_errors(run_cli, args, needle) -> None:
    code, out, err = run_cli("train", *args, tiny=False)
    assert code == 2 and not out and err.count("\n") == 1 and needle in err, err


def test_override_commands_refuse_unknown_flags(run_cli) -> None:
    code, out, err = run_cli("params", "--cfg", "job", tiny=False)
    assert code == 2 and not out and "--cfg" in err and "--help" in err


def _report_command(out: str) -> list[str]:
    lines = [line for line in out.splitlines() if line.startswith("report: moe-lora report ")]
    assert len(lines) == 1, out
    return shlex.split(lines[0].removeprefix("report: moe-lora "))


def test_run_and_sweep_end_with_their_report_command(run_cli, tmp_path) -> None:
    """The printed command works as printed (run through the same entry point)."""
    code, out, err = run_cli("train", "adapter=lora", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err
    assert _report_command(out) == ["report", str(tmp_path / "run")]
    sweep = tmp_path / "my sweep"  # a space: the command is quoted to paste as is
    code, out, err = run_cli("train", "-m", "adapter=lora", f"hydra.sweep.dir={sweep}")
    assert code == 0, err
    assert f"sweep: {sweep}" in out.splitlines()
    command = _report_command(out)
    assert command == ["report", str(sweep)]
    code, out, err = run_cli(*command, "--out", str(tmp_path / "report"), tiny=False)
    assert code == 0 and (tmp_path / "report" / "index.md").is_file(), err
