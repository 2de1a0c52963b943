"""``moe-lora``: one console script with subcommands, each taking Hydra overrides.

Before Hydra starts a job, every config the command line describes (each combination of a
multirun sweep) is composed and validated here, so bad input gets a one-line error naming the key,
exits non-zero and leaves no run directory behind. Offline-ness is decided first of all: downloads
are off unless ``HF_HUB_OFFLINE=0`` is set, before transformers is imported.
"""

from __future__ import annotations

import difflib
import signal
import sys
from pathlib import Path

from moe_lora.env import register_resolvers, set_environment
from moe_lora.errors import ConfigError, fail, one_line

HELP = """usage: moe-lora COMMAND [hydra overrides...]

commands:
  train    train, evaluate and report one run (-m for a multirun sweep)
  params   trainable / total parameter table of a config, without training
  eval     re-evaluate a saved run: moe-lora eval run_dir=outputs/<date>/<run>
  report   tables and plots from run folders: moe-lora report multirun/<date>/<time> [--out DIR]
  bench    step time and memory of every variant against peft LoRA (--help for options)
  layout-from-probe   a layout YAML from a probe run's router telemetry (--help for options)
  search-confirm      a preset rerunning a layout search's best trials as claims (--help)
  pages    docs/results pages from report files: moe-lora pages [--check] [--from NAME=REPORT]
  generate greedy completions of a trained run: moe-lora generate <run_dir> --prompt TEXT [--routes]
  export   merged | peft | moe_lora folder of a run: moe-lora export <run_dir> --format F --out DIR

examples:
  moe-lora train                                   # LoRAMoE on the built-in world
  moe-lora train adapter=lora recipe=smoke
  moe-lora train -m adapter=lora,loramoe seed=0,1,2
  moe-lora params adapter=loramoe adapter.num_experts=4

moe-lora COMMAND --help: a command's options; moe-lora train --help: the config groups and keys;
moe-lora train --cfg job adapter=mola: the composed config, nothing trained
"""


def cmd_train(args: list[str]) -> int:
    from moe_lora.recipes.job import launch

    return launch(args)


PARAMS_HELP = """usage: moe-lora params [group=option ...] [key=value ...]

The trainable / total parameter table of the config the overrides compose (the same overrides as
`moe-lora train`), per adapted module, without loading data or training. A model.name_or_path
checkpoint is read for its config.json only.

examples:
  moe-lora params adapter=loramoe adapter.num_experts=4
  moe-lora params adapter=mola layout=inverted_triangle

groups, their options and every key's default: moe-lora train --help
"""

EVAL_HELP = """usage: moe-lora eval run_dir=DIR [key=value ...]

Re-evaluate a finished run: its saved config.yaml (with the overrides, e.g. eval.* keys) and its
adapter on the base model; writes eval-<time>.json and its predictions beside the run.

example:
  moe-lora eval run_dir=outputs/<date>/<run> data.eval_per_task=50
"""


def wants_help(args: list[str], usage: str) -> bool:
    """Print ``usage`` for -h/--help; a command taking overrides refuses other flags in one line
    instead of ignoring them."""
    if "-h" in args or "--help" in args:
        print(usage, end="")
        return True
    flags = [a for a in args if a.startswith("-")]
    if flags:
        raise ConfigError(f"{flags[0]}: not an option of this command, which takes key=value overrides (--help)")
    return False


def cmd_params(args: list[str]) -> int:
    from moe_lora.recipes.compose import load_config, split_args
    from moe_lora.recipes.params import print_params

    if wants_help(args, PARAMS_HELP):
        return 0
    _, overrides = split_args(args)
    print_params(load_config(overrides, check_files=False))  # reads a checkpoint's config.json if there is one
    return 0


def cmd_eval(args: list[str]) -> int:
    from moe_lora.recipes.compose import split_args
    from moe_lora.recipes.reeval import reevaluate
    from moe_lora.recipes.results import summary_table

    if wants_help(args, EVAL_HELP):
        return 0
    _, overrides = split_args(args)
    run_dirs = [o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")]
    if not run_dirs:
        return fail("run_dir is required: moe-lora eval run_dir=outputs/<date>/<run>")
    out, record = reevaluate(Path(run_dirs[0]), [o for o in overrides if not o.startswith("run_dir=")])
    print(summary_table(record))  # what `train` prints
    print(f"written: {out}")
    return 0


def cmd_report(args: list[str]) -> int:
    from moe_lora.report.build import main as report_main

    return report_main(args)


def cmd_bench(args: list[str]) -> int:
    from moe_lora.bench.run import main as bench_main

    return bench_main(args)


def cmd_layout_from_probe(args: list[str]) -> int:
    from moe_lora.recipes.probe import main as probe_main

    return probe_main(args)


def cmd_search_confirm(args: list[str]) -> int:
    from moe_lora.recipes.search_confirm import main as search_main

    return search_main(args)


def cmd_pages(args: list[str]) -> int:
    from moe_lora.report.pages import main as pages_main

    return pages_main(args)


def cmd_generate(args: list[str]) -> int:
    from moe_lora.recipes.use import generate_main

    return generate_main(args)


def cmd_export(args: list[str]) -> int:
    from moe_lora.recipes.use import export_main

    return export_main(args)


COMMANDS = {
    "train": cmd_train,
    "params": cmd_params,
    "eval": cmd_eval,
    "report": cmd_report,
    "bench": cmd_bench,
    "layout-from-probe": cmd_layout_from_probe,
    "search-confirm": cmd_search_confirm,
    "pages": cmd_pages,
    "generate": cmd_generate,
    "export": cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    set_environment()
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    cmd, rest = args[0], args[1:]
    if cmd not in COMMANDS:
        close = difflib.get_close_matches(cmd, COMMANDS, n=1)
        return fail(
            f"unknown command {cmd!r}"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + f" (commands: {', '.join(COMMANDS)})"
        )
    register_resolvers()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from moe_lora.train.preempt import interruptible

    try:
        with interruptible():  # SIGTERM too: one line, not a silent end
            return COMMANDS[cmd](rest)
    except (ConfigError, HydraException, OmegaConfBaseException) as exc:
        return fail(one_line(exc))
    except KeyboardInterrupt as exc:  # ^C or SIGTERM outside training (training checkpoints first)
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"moe-lora: interrupted ({signal.Signals(signum).name})", file=sys.stderr, flush=True)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
