"""Every command in the code blocks of README.md and docs/*.md works, in a cheap form.

Commands are read from the documents themselves, so a broken example fails here:
- `moe-lora train ...` (and `torchrun ... -m moe_lora train ...`): every value of every sweep is
  composed and validated as the pre-launch check does (files are not required: paths in the docs
  are examples), and Hydra's own overrides (launchers, run folders) are composed too;
- `moe-lora params ...` runs for real (meta device);
- `moe-lora bench ...` runs for real on a one-layer shape and two rounds; `moe-lora report ...`
  runs for real on a fabricated sweep; `moe-lora pages --check` runs for real; the other
  subcommands' arguments are parsed by their own parsers;
- `$ moe-lora ...` lines in console blocks are run and their documented output lines (an error,
  a parameter count) must appear in the real output;
- `make TARGET [VAR=...]` must be a target `make -n` accepts; presets and overrides it passes are
  composed; `python scripts/X.py ...` is parsed by the script's parser; `pip install -e ".[x]"`
  names an extra of pyproject.toml.
A command of any other kind fails the test, so a new kind of example gets a check before it ships.
Placeholders (`<newest>`, `<run folder>`) stand for paths and are replaced by one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # docs/results/ is generated
PLACEHOLDER = "outputs/PLACEHOLDER"
CHEAP_BENCH = ["--rounds", "2", "--layers", "1", "--seq", "16", "--batch", "2", "--vocab", "512"]
CHEAP_BENCH += ["--threads", "1", "--device", "cpu", "--large", "none"]


@dataclass
class Command:
    doc: str
    line: int
    text: str
    expected: list[str] = field(default_factory=list)  # console blocks: output lines shown under `$ ...`

    @property
    def argv(self) -> list[str]:
        return shlex.split(re.sub(r"<[^>]*>", PLACEHOLDER, self.text))

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def _strip_comment(line: str) -> str:
    return re.sub(r"(^|\s+)#.*$", "", line).rstrip()


def commands_in(doc: Path) -> list[Command]:
    """Shell lines (continuations joined, comments and env assignments dropped) of every fenced
    block; in blocks of `$ ` lines, each command with the output lines under it."""
    found: list[Command] = []
    lines = doc.read_text().splitlines()
    name = str(doc.relative_to(ROOT))
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        start, i = i, i + 1
        block: list[tuple[int, str]] = []
        while i < len(lines) and not lines[i].startswith("```"):
            block.append((i + 1, lines[i]))
            i += 1
        i += 1
        console = any(text.startswith("$ ") for _, text in block)
        if lines[start].strip() not in ("```bash", "```sh") and not console:
            continue  # a tree, a file or program output: no commands
        pending = ""
        for number, text in block:
            if console:
                if text.startswith("$ "):
                    found.append(Command(name, number, text[2:].strip()))
                elif found and found[-1].doc == name and text.strip() and text.strip() != "...":
                    found[-1].expected.append(text.rstrip())
                continue
            text = _strip_comment(text)
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            text, pending = (pending + text).strip(), ""
            text = re.sub(r"^(\w+=\S+\s+)+", "", text)  # HF_HUB_OFFLINE=0 cmd ...
            if text:
                found.append(Command(name, number, text))
    return found


COMMANDS = [c for doc in DOCUMENTS for c in commands_in(doc)]


# ---------------------------------------------------------------------------------------------- checks
class Parsed(Exception):
    """Raised by the patched ArgumentParser.parse_args once the real parser accepted the arguments."""


@contextlib.contextmanager
def parse_only():
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def assert_parses(main, args: list[str]) -> None:
    with parse_only(), pytest.raises(Parsed):
        main(args)


def _diagonal(overrides: list[str]) -> list[list[str]]:
    """Combinations that hold every value of every sweep at least once (not the full product)."""
    from moe_lora.recipes.compose import _axes

    axes = _axes(overrides)
    n = max((len(a) for a in axes), default=1)
    return [[a[k % len(a)] for a in axes] for k in range(n)]


@functools.cache
def _composed(overrides: tuple[str, ...], hydra: bool = False) -> None:
    """One composition (and validation) per distinct command line: documents repeat some."""
    from moe_lora.recipes.compose import compose, load_config

    if hydra:
        compose(list(overrides), return_hydra_config=True)
    else:
        load_config(list(overrides), check_files=False)


def check_train(args: list[str]) -> None:
    from moe_lora.recipes.compose import first_job, split_args

    _, overrides = split_args(args)
    training = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    for combo in _diagonal(training):
        _composed(tuple(combo))
    if len(training) < len(overrides):  # launchers, run and sweep folders: Hydra's own config
        _composed(tuple(first_job(overrides)), hydra=True)


def check_params(args: list[str], expected: list[str], run_cli) -> None:
    code, out, err = run_cli("params", *args, tiny=False)
    assert code == 0, out + err
    for line in expected:  # "trainable: 18,284,544 (...) | ..." : the shown part must be printed
        shown = line.removesuffix("...").rstrip().rstrip("|").rstrip()
        assert shown in out, f"documented {shown!r} not in the output:\n{out}"


def check_report(args: list[str], tmp_path: Path) -> None:
    from moe_lora.report.build import main as report_main
    from tests.report.test_report import fake_run

    sweep = tmp_path / "sweep"
    fake_run(sweep / "0", "lora", 0, 0.6, 0.5, 0.0)
    fake_run(sweep / "1", "lora", 1, 0.7, 0.6, 0.0)
    real, skip = [], False
    for a in args:  # paths become the fabricated sweep; --out a fresh folder
        if skip:
            real.append(str(tmp_path / "report"))
            skip = False
        elif a == "--out":
            real.append(a)
            skip = True
        elif a.startswith("-") or (real and real[-1] == "--bootstrap"):
            real.append(a)
        else:
            real.append(str(sweep))
    assert report_main(real) == 0


def check_bench(args: list[str], tmp_path: Path) -> None:
    from moe_lora.bench.run import main as bench_main

    real = []
    for a, before in zip(args, [None, *args], strict=False):
        if before in ("--out", "--plot"):
            real.append(str(tmp_path / Path(a).name))
        else:
            real.append(a)
    assert bench_main([*real, *CHEAP_BENCH]) == 0


def check_make(args: list[str]) -> None:
    targets = [a for a in args if "=" not in a and not a.startswith("-")]
    variables = dict(a.split("=", 1) for a in args if "=" in a)
    run = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for preset in variables.get("PRESETS", "").split():
        check_train([f"experiment={preset}"])
    if "run" in targets and variables.get("ARGS"):
        check_train(shlex.split(variables["ARGS"]))


def check_python(args: list[str], tmp_path: Path) -> None:
    script = ROOT / args[0]
    assert script.is_file(), f"{args[0]} does not exist"
    if script.name == "prepare_data.py":  # a dry run: what it would fetch (P3's config list offline)
        import datasets

        module = runpy.run_path(str(script), run_name="prepare_data")
        listing, datasets.get_dataset_config_names = datasets.get_dataset_config_names, lambda path: []
        try:
            assert module["main"]([*args[1:], "--dry-run", "--root", str(tmp_path / "data")]) == 0
        finally:
            datasets.get_dataset_config_names = listing
        return
    old = sys.argv
    sys.argv = [str(script), *args[1:]]
    try:
        with parse_only(), pytest.raises(Parsed):
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = old


def check_pip(args: list[str]) -> None:
    text = (ROOT / "pyproject.toml").read_text()  # no tomllib before Python 3.11
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = re.findall(r"^([\w-]+)\s*=", section, flags=re.M)
    for spec in args:
        match = re.fullmatch(r"\.\[([\w,-]+)\]", spec)
        if match:
            assert set(match[1].split(",")) <= set(extras), f"{spec}: extras are {sorted(extras)}"


def moe_lora_args(argv: list[str]) -> list[str] | None:
    """The `moe-lora` arguments of a command line (torchrun's `-m moe_lora ...` included)."""
    if argv[0] == "moe-lora":
        return argv[1:]
    if argv[0] == "torchrun" and "moe_lora" in argv:
        return argv[argv.index("moe_lora") + 1 :]
    return None


def exercise(command: Command, run_cli, tmp_path: Path) -> None:
    from moe_lora.cli import COMMANDS as SUBCOMMANDS

    argv = command.argv
    args = moe_lora_args(argv)
    if args is not None:
        if command.expected and command.expected[0].startswith("moe-lora: error:"):
            code, out, err = run_cli(*args, tiny=False)
            assert code != 0 and command.expected[0] in out + err, (
                f"documented:\n{command.expected[0]}\ngot:\n{out}{err}"
            )
            return
        sub, rest = (args[0], args[1:]) if args else ("--help", [])
        if sub in ("--help", "-h"):
            assert run_cli(sub, tiny=False)[0] == 0
        elif sub == "train":
            check_train(rest)
        elif sub == "params":
            check_params(rest, command.expected, run_cli)
        elif sub == "eval":
            assert rest and rest[0].startswith("run_dir="), "moe-lora eval takes run_dir=<run folder> first"
            check_train(rest[1:])
        elif sub == "report":
            check_report(rest, tmp_path)
        elif sub == "bench":
            check_bench(rest, tmp_path)
        elif sub == "pages" and rest == ["--check"]:
            assert run_cli(sub, *rest, tiny=False)[0] == 0
        else:
            assert sub in SUBCOMMANDS, f"no subcommand {sub!r}"
            assert_parses(lambda a: SUBCOMMANDS[sub](a), rest)
    elif argv[0] == "make":
        check_make(argv[1:])
    elif argv[0] == "python" and argv[1].startswith("scripts/"):
        check_python(argv[1:], tmp_path)
    elif argv[:3] == ["pip", "install", "-e"]:
        check_pip(argv[3:])
    elif argv[0] == "huggingface-cli":
        pass  # another project's tool (its download needs the network)
    else:
        pytest.fail(f"{command}: no check for this kind of command; add one to {Path(__file__).name}")


def _marks(command: Command) -> list:
    """The default bench measures every variant, torch.compile included: ~25 s on one thread; a
    run of the real SmolLM2 reads its 135M weights: ~5 s; an expert sweep over more than two counts
    ~5 s (a two-count sweep stays fast). All run in the whole suite."""
    argv = command.argv
    args = moe_lora_args(argv) or []
    counts = args[args.index("--experts") + 1].split(",") if "--experts" in args[:-1] else []
    heavy = args == ["bench"] or ("model=smollm2_135m" in argv and "train" in argv) or len(counts) > 2
    return [pytest.mark.slow] if heavy else []


@pytest.mark.parametrize("command", [pytest.param(c, id=str(c), marks=_marks(c)) for c in COMMANDS])
def test_documented_command_works(command: Command, run_cli, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing a check writes lands in the repository
    (tmp_path / "docs" / "results").mkdir(parents=True)
    if (moe_lora_args(command.argv) or [])[:1] == ["bench"]:  # trace the compiled variant without minutes of codegen
        import torch

        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    exercise(command, run_cli, tmp_path)


def inline_commands(doc: Path) -> list[str]:
    """`moe-lora ...`, `make ...` and `python scripts/...` spans in the prose (outside code blocks)."""
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M).replace("\n", " ")
    return re.findall(r"`((?:moe-lora|make|python) [^`]*)`", text)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_named_in_the_prose_exist(doc: Path) -> None:
    """Prose mentions (often usage forms such as `moe-lora report PATH... [--out DIR]`) are not run,
    but the subcommand, make target or script each names must exist."""
    from moe_lora.cli import COMMANDS as SUBCOMMANDS

    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    for span in inline_commands(doc):
        words = span.split()
        if words[0] == "moe-lora":
            assert words[1] in SUBCOMMANDS or words[1] in ("--help", "-h"), f"{doc.name}: `{span}`"
        elif words[0] == "make":
            assert words[1] in targets, f"{doc.name}: `{span}`: no target {words[1]!r}"
        else:
            assert (ROOT / words[1]).is_file(), f"{doc.name}: `{span}`: no {words[1]}"


def test_the_documents_show_the_commands_that_matter() -> None:
    shown = {" ".join(c.argv[:2]) for c in COMMANDS}
    for wanted in ("make run", "make test", "moe-lora train", "moe-lora params", "moe-lora report", "moe-lora bench"):
        assert wanted in shown, f"no documented `{wanted}` command"
    assert len(COMMANDS) > 40


@pytest.mark.parametrize(
    "broken",
    [
        "moe-lora train adapter=lorra recipe=smoke",  # a typo'd config choice
        "moe-lora train -m adapter=lora,lorra seed=0,1",  # ... in the second value of a sweep
        "moe-lora train -m hydra/launcher=slurmm seed=0,1",  # a launcher that does not exist
        "moe-lora params model=llama2_7b adapter=mola layout=inverted_triangel",
        "moe-lora report multirun/x --bootstrapp 10",
        "moe-lora layout-from-probe outputs/x --rule usgae",
        "make tabels",
        "make tables PRESETS=mola_layout",
        "python scripts/prepare_data.py --data cbqa_instruct_hubb --root /data",
        'pip install -e ".[evall]"',
        "moe-lora trian adapter=lora",
    ],
)
def test_a_broken_command_fails(broken: str, run_cli, tmp_path, monkeypatch) -> None:
    from hydra.errors import HydraException

    from moe_lora.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises((AssertionError, SystemExit, ConfigError, HydraException)):
        exercise(Command("test", 0, broken), run_cli, tmp_path)


def test_documented_errors_and_counts_are_compared(run_cli) -> None:
    """A console example whose output is wrong fails, even though its command runs."""
    wrong_error = Command("t", 0, "moe-lora train adapter=lorra", ["moe-lora: error: (available: lora, loramoe)"])
    with pytest.raises(AssertionError):
        exercise(wrong_error, run_cli, Path("."))
    wrong_count = Command("t", 0, "moe-lora params model=llama2_7b adapter=hydralora", ["trainable: 18,284,545 | ..."])
    with pytest.raises(AssertionError):
        exercise(wrong_count, run_cli, Path("."))
