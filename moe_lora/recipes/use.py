"""``moe-lora generate`` and ``moe-lora export``: a trained run used as a model.

Generation goes through evaluation's own code (:func:`moe_lora.eval.generate.greedy_generate`)
with the run's settings (``data.chat_template``, ``eval.max_new_tokens``, ``eval.batch_size``),
so a prompt that evaluation scored by generation gets the completion stored in
``predictions.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_lora.errors import ConfigError, first_line
from moe_lora.eval.generate import eos_ids, greedy_generate
from moe_lora.recipes.api import build, read_saved
from moe_lora.recipes.export import FORMATS, export
from moe_lora.routing.trace import routes_heatmap, routes_table, tracing

GENERATE_HELP = """Greedy completions of prompts by a trained run (or a moe_lora export).

The prompts are formatted as evaluation formats them: with the tokenizer's chat template when the
run trained with data.chat_template=true (override with --chat-template / --no-chat-template).
Completions are cut at the first --stop string (default: a newline, as evaluation's sets cut
them in predictions.jsonl; --no-stop for free-running text)."""

EXPORT_HELP = """Export a trained run: merged (a plain transformers checkpoint with the adapter folded in;
LoRA, MELoRA, ALoRA, IA3, full), peft (peft's adapter format: LoRA-type and IA3) or moe_lora
(a self-contained folder for every variant, loadable by moe_lora.load; docs/export-format.md)."""


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-lora generate", description=GENERATE_HELP)
    p.add_argument("run_dir", help="a finished run folder or a moe_lora export")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--file", help='a JSONL file of prompts: {"prompt": ...} per line (predictions.jsonl works)')
    p.add_argument("--max-new-tokens", type=int, help="default: the run's eval.max_new_tokens")
    p.add_argument(
        "--stop", action="append", help=r"cut at this string (repeatable; \n, \t escapes; default: a newline)"
    )
    p.add_argument("--no-stop", action="store_true", help="no stop string: generate to EOS or --max-new-tokens")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat-template", dest="chat", action="store_const", const=True, help="use the chat template")
    chat.add_argument("--no-chat-template", dest="chat", action="store_const", const=False, help="plain prompts")
    p.add_argument("--batch-size", type=int, help="default: the run's eval.batch_size")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--jsonl", action="store_true", help='print {"prompt", "completion"} JSON lines')
    p.add_argument("--routes", action="store_true", help="print each generated token's experts per layer, and a PNG")
    p.add_argument("--routes-dir", default="routes", help="where --routes writes routes-<n>.png (default: ./routes)")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.file:
        path = Path(args.file)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"--file {path} cannot be read ({first_line(exc, 160)})") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ConfigError(f"--file {path} line {i} is not JSON") from None
            prompt = row.get("prompt") if isinstance(row, dict) else row
            if not isinstance(prompt, str):
                raise ConfigError(f'--file {path} line {i} has no "prompt" string')
            prompts.append(prompt)
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --file prompts.jsonl")
    return prompts


def generate_main(argv: list[str]) -> int:
    args = generate_parser().parse_args(argv)
    prompts = read_prompts(args)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    saved = read_saved(args.run_dir)
    model, tok, _ = build(saved, args.device)
    cfg = saved.cfg
    chat = cfg.data.chat_template if args.chat is None else args.chat
    if chat and not getattr(tok, "chat_template", None):
        raise ConfigError(f"--chat-template: the tokenizer of {cfg.model.name_or_path or cfg.model.name} has none")
    if args.chat is None and not chat and getattr(tok, "chat_template", None):
        print(
            "note: the tokenizer has a chat template, but the run trained without it (data.chat_template=false); "
            "prompts are plain (--chat-template to use it)",
            file=sys.stderr,
        )
    stop = () if args.no_stop else tuple(unescape(s) for s in args.stop) if args.stop else ("\n",)
    options = {
        "max_new_tokens": args.max_new_tokens or cfg.eval.max_new_tokens,
        "stop": stop,
        "chat_template": chat,
        "max_source": cfg.data.lengths(True)[0] if getattr(model.config, "is_encoder_decoder", False) else None,
    }
    if args.routes:
        return generate_routes(model, tok, saved, prompts, options, Path(args.routes_dir), args.jsonl)

    completions = greedy_generate(model, tok, prompts, batch_size=args.batch_size or cfg.eval.batch_size, **options)
    for prompt, completion in zip(prompts, completions, strict=True):
        show(prompt, completion, args.jsonl)
    return 0


def unescape(text: str) -> str:
    """``--stop '\\n'`` typed in a shell is a backslash and an n: read it as the newline it means."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def show(prompt: str, completion: str, jsonl: bool) -> None:
    if jsonl:
        print(json.dumps({"prompt": prompt, "completion": completion}), flush=True)
    else:
        print(f"> {prompt}\n{completion}\n", flush=True)


def generate_routes(model, tok, saved, prompts: list[str], options: dict, folder: Path, jsonl: bool) -> int:
    """One prompt at a time, every router traced: the completion, its routes table and heatmap."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError("--routes traces decoder-only models; this run's model is an encoder-decoder")
    eos = set(eos_ids(model, tok))
    for n, prompt in enumerate(prompts, 1):
        with tracing(model) as trace:
            (completion,) = greedy_generate(model, tok, [prompt], batch_size=1, **options)
        show(prompt, completion, jsonl)
        if not trace.routers:
            print(f"adapter={saved.cfg.adapter.name} has no routers: every token takes the same path")
            continue
        steps = []
        for step in trace.steps:  # up to (without) EOS, as the completion
            if step.token in eos:
                break
            steps.append(step)
        print(f"routes of the {len(steps)} generated tokens (top-k experts by mean router probability per layer):")
        print(routes_table(tok, trace, steps))
        png = routes_heatmap(tok, trace, steps, folder / f"routes-{n}.png", title=prompt)
        if png is not None:
            print(f"heatmap: {png}\n")
    return 0


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-lora export", description=EXPORT_HELP)
    p.add_argument("run_dir", help="a finished run folder (or a moe_lora export)")
    p.add_argument("--format", required=True, choices=FORMATS, help="merged | peft | moe_lora")
    p.add_argument("--out", required=True, help="the folder to write (written whole or not at all)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if an earlier export wrote it")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload --out to this hub repo (needs HF_HUB_OFFLINE=0)")
    p.add_argument("--device", default="cpu", help="torch device for the merge (default: cpu)")
    return p


def export_main(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    out = export(args.run_dir, args.format, args.out, args.overwrite, args.push_to_hub, args.device)
    print(f"written: {out} ({args.format})")
    if args.push_to_hub:
        print(f"uploaded: https://huggingface.co/{args.push_to_hub}")
    return 0
