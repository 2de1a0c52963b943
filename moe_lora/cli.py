"""``moe-lora``: one console script with subcommands, each taking Hydra overrides.

Before Hydra starts a job, every config the command line describes (each combination of a
multirun sweep) is composed and validated here, so bad input gets a one-line error naming the key,
exits non-zero and leaves no run directory behind. Offline-ness is decided first of all: downloads
are off unless ``HF_HUB_OFFLINE=0`` is set, before transformers is imported.
"""

from __future__ import annotations

import difflib
import itertools
import os
import secrets
import sys
from pathlib import Path

HELP = """usage: moe-lora COMMAND [hydra overrides...]

commands:
  train    train, evaluate and report one run (-m for a multirun sweep)
  params   trainable / total parameter table of a config, without training
  eval     re-evaluate a saved run: moe-lora eval run_dir=outputs/<date>/<run>
  report   tables and plots from run folders: moe-lora report multirun/<date>/<time> [--out DIR]
  bench    step time and memory of every variant against peft LoRA (--help for options)

examples:
  moe-lora train                                   # LoRAMoE on the built-in world
  moe-lora train adapter=lora recipe=smoke
  moe-lora train -m adapter=lora,loramoe seed=0,1,2
  moe-lora params adapter=loramoe adapter.num_experts=4
"""

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                      "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}
_HYDRA_FLAGS = {"-m", "--multirun", "--resolve", "--run", "-r", "--help", "-h", "--hydra-help", "--version"}
_SKIP_PRECHECK = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--help", "-h",
                  "--hydra-help", "--version", "--info", "-i", "--experimental-rerun"}


def set_environment() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MOE_LORA_UID", secrets.token_hex(3))  # shared with launcher subprocesses


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("moe_lora.uid"):
        OmegaConf.register_new_resolver("moe_lora.uid", lambda: os.environ.setdefault("MOE_LORA_UID", secrets.token_hex(3)))


_register_resolvers()


def fail(message: str, code: int = 2) -> int:
    print(f"moe-lora: error: {message}", file=sys.stderr)
    return code


def one_line(exc: BaseException) -> str:
    """Hydra and OmegaConf errors span several lines; keep the outer and innermost first lines."""
    from hydra.errors import MissingConfigException

    if isinstance(exc, MissingConfigException) and exc.options:
        missing = (exc.missing_cfg_file or "").split("/")[-1]
        close = difflib.get_close_matches(missing, exc.options, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{str(exc).splitlines()[0]}{hint} (available: {', '.join(sorted(exc.options))})"
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from moe_lora.errors import first_line

    if isinstance(exc, OverrideParseException) and exc.override and exc.override not in str(exc):
        return f"cannot parse override {exc.override!r}: {str(exc).strip().splitlines()[0]}"
    inner, cur = exc, exc
    while (cur := cur.__cause__ or cur.__context__) is not None:  # first formatted Hydra/OmegaConf cause
        if isinstance(cur, (HydraException, OmegaConfBaseException)) and "$" not in str(cur):
            inner = cur
            break
    first = first_line(exc)
    if inner is exc:
        return first
    detail = first_line(inner)
    return first if detail in first else f"{first.rstrip('.')}: {detail}"


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides)."""
    flags, overrides = [], []
    it = iter(args)
    for a in it:
        if a in _HYDRA_VALUE_FLAGS:
            flags += [a, next(it, "")]
        elif a in _HYDRA_FLAGS or a.startswith("--"):
            flags.append(a)
        else:
            overrides.append(a)
    return flags, overrides


def expand_sweeps(overrides: list[str], limit: int = 256) -> list[list[str]]:
    """Every combination a basic multirun would launch (hydra/* overrides are left out)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.lstrip("+~").startswith("hydra")])
    axes = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_interval_sweep():  # a search space (Optuna): check both of its ends
            axes.append([f"{key}={o.value().start}", f"{key}={o.value().end}"])
        elif o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(c) for c in itertools.islice(itertools.product(*axes), limit)]


def compose(overrides: list[str], return_hydra_config: bool = False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import moe_lora.adapters
    import moe_lora.config  # noqa: F401

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="moe_lora"):
        return hydra_compose(config_name="train", overrides=overrides, return_hydra_config=return_hydra_config)


def to_config(dcfg, check_files: bool = True):
    """DictConfig -> validated TrainConfig (runs every ``__post_init__`` and the cross checks)."""
    from omegaconf import OmegaConf

    from moe_lora.errors import ConfigError
    from moe_lora.validate import validate

    try:
        cfg = OmegaConf.to_object(dcfg)
    except Exception as exc:  # OmegaConf wraps errors raised in __post_init__
        inner = exc
        while inner is not None and not isinstance(inner, ConfigError):
            inner = inner.__cause__ or inner.__context__
        raise (inner or exc) from None
    validate(cfg, check_files)
    return cfg


def load_config(overrides: list[str], check_files: bool = True):
    return to_config(compose(overrides), check_files)


def precheck(overrides: list[str], multirun: bool):
    """Every job's config validated and the output folder checked; the first job's config."""
    combos = expand_sweeps(overrides) if multirun else [overrides]
    cfgs = [load_config(combo) for combo in combos]
    check_output_dir(combos[0], multirun, cfgs[0])
    return cfgs[0]


def check_output_dir(overrides: list[str], multirun: bool, cfg) -> None:
    """Before Hydra creates anything: the run (sweep) folder can be created, and a run folder holds
    no earlier run's results nor checkpoints unless ``resume`` says to continue it."""
    from omegaconf import OmegaConf

    from moe_lora.errors import ConfigError
    from moe_lora.train.checkpoint import plan
    from moe_lora.train.runner import resolved_config

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    out = Path(OmegaConf.select(compose(overrides, return_hydra_config=True), key))
    if not multirun:
        plan(out, cfg.resume, resolved_config(cfg), sweep=False)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(out)!r} cannot be created: {probe} is not a writable folder")


# ----------------------------------------------------------------------------------------- train
def cmd_train(args: list[str]) -> int:
    import hydra

    from moe_lora.train.distributed import env_world_size
    from moe_lora.train.job import check_launch, torchrun_rank, train_job

    flags, overrides = split_args(args)
    multirun = "-m" in flags or "--multirun" in flags
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "SUBMITIT_EXECUTOR" not in os.environ)
    if torchrun and env_world_size() > 1 and multirun:
        return fail("torchrun starts one job; for a sweep use `moe-lora train -m ... recipe.nproc_per_node=N`")
    if not any(f in _SKIP_PRECHECK for f in flags) and "--cfg" not in flags and "-c" not in flags:
        cfg = precheck(overrides, multirun=multirun)
        if torchrun and env_world_size() > 1:
            check_launch(cfg.recipe.nproc_per_node)
            if int(os.environ.get("RANK", "0")) != 0:
                return torchrun_rank(args, overrides)
    sys.argv = ["moe-lora train", *args]
    main_fn = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")(train_job)
    main_fn()
    from moe_lora.train.distributed import destroy

    destroy()
    return 0


# ---------------------------------------------------------------------------------------- params
def cmd_params(args: list[str]) -> int:
    """Parameter table on the meta device: no weights are allocated, no download happens."""
    from moe_lora.adapters import ADAPTERS
    from moe_lora.adapters.inject import count_parameters, inject_adapter, targets_table
    from moe_lora.routing.router import Router
    from moe_lora.structure import format_targets, read_structure
    from moe_lora.validate import base_meta_model

    _, overrides = split_args(args)
    cfg = load_config(overrides, check_files=False)  # reads a checkpoint's config.json where there is one
    model = base_meta_model(cfg)
    base_total = sum(p.numel() for p in model.parameters())
    structure = read_structure(model, cfg.model.modules)
    if ADAPTERS.get(cfg.adapter.name).wrap is not None:
        print(format_targets(targets_table(model, cfg.adapter, cfg.model)) + "\n")
    names = inject_adapter(model, cfg.adapter, cfg.model, cfg.layout)
    counts = count_parameters(model)
    if names:
        print(f"{'module':<44} {'layer':>5} {'experts':>7} {'rank':>5} {'top_k':>5} {'trainable':>12}")
    for name in names:
        mod = model.get_submodule(name)
        routers = [m for m in mod.modules() if isinstance(m, Router)]
        experts = routers[0].num_experts if routers else getattr(mod, "num_experts", 1)
        k = routers[0].top_k if routers else None
        n = sum(p.numel() for p in mod.parameters() if p.requires_grad)
        layer = structure.layer_of(name)
        print(f"{name:<44} {layer!s:>5} {experts:>7} {getattr(mod, 'rank', '-')!s:>5} {k!s:>5} {n:>12,}")
    t, r = counts["trainable"], counts["routers"]
    print(f"\nmodel {cfg.model.name}: {base_total:,} base parameters; adapter {cfg.adapter.name}, layout {cfg.layout.name}")
    print(f"trainable: {t:,} ({100 * t / base_total:.4f}% of base) | without routers: {t - r:,} "
          f"({100 * (t - r) / base_total:.4f}%) | routers: {r:,} | total: {counts['total']:,}")
    return 0


# ------------------------------------------------------------------------------------------ eval
def cmd_eval(args: list[str]) -> int:
    import time

    from omegaconf import OmegaConf

    from moe_lora.adapters.inject import inject_adapter
    from moe_lora.tracking import write_json_atomic, write_jsonl_atomic
    from moe_lora.train.checkpoint import load_adapter
    from moe_lora.train.runner import ADAPTER_FILE, run_eval, setup

    _, overrides = split_args(args)
    run_dirs = [o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")]
    if not run_dirs:
        return fail("run_dir is required: moe-lora eval run_dir=outputs/<date>/<run>")
    run_dir = Path(run_dirs[0])
    for needed in ("config.yaml", ADAPTER_FILE):
        if not (run_dir / needed).exists():
            return fail(f"run_dir={str(run_dir)!r} has no {needed} (not a finished moe-lora run)")
    saved = OmegaConf.load(run_dir / "config.yaml")
    extra = [o for o in overrides if not o.startswith("run_dir=")]
    dcfg = compose([f"adapter={saved.adapter.name}"])
    dcfg = OmegaConf.merge(dcfg, saved, OmegaConf.from_dotlist(extra))
    cfg = to_config(dcfg)
    precision, model, tok, mixture = setup(cfg)
    inject_adapter(model, cfg.adapter, cfg.model, cfg.layout)
    load_adapter(model, run_dir / ADAPTER_FILE)
    metrics, predictions = run_eval(model, tok, mixture, cfg, precision, progress=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = run_dir / f"eval-{stamp}.json"
    write_jsonl_atomic(run_dir / f"eval-{stamp}-predictions.jsonl", [{"model": "tuned", **r} for r in predictions])
    write_json_atomic(out, {"run_dir": str(run_dir), "metrics": metrics})
    for k, v in metrics.items():
        print(f"{k:<24} {v}")
    print(f"written: {out}")
    return 0


def cmd_report(args: list[str]) -> int:
    from moe_lora.report.build import main as report_main

    return report_main(args)


def cmd_bench(args: list[str]) -> int:
    from moe_lora.bench.run import main as bench_main

    return bench_main(args)


COMMANDS = {"train": cmd_train, "params": cmd_params, "eval": cmd_eval, "report": cmd_report, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    set_environment()
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    cmd, rest = args[0], args[1:]
    if cmd not in COMMANDS:
        close = difflib.get_close_matches(cmd, COMMANDS, n=1)
        return fail(f"unknown command {cmd!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                    + f" (commands: {', '.join(COMMANDS)})")
    _register_resolvers()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from moe_lora.errors import ConfigError

    try:
        return COMMANDS[cmd](rest)
    except (ConfigError, HydraException, OmegaConfBaseException) as exc:
        return fail(one_line(exc))


if __name__ == "__main__":
    sys.exit(main())
