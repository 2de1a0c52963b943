"""Using a trained run: moe_lora.load, generate (equal to evaluation's stored greedy predictions),
export (merged / peft / moe_lora, each checked against the adapted model's logits), the bad-input
lines, and moe_lora.add_adapter inside an HF Trainer with the aux loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import THREADS, TINY, read_jsonl

VARIANTS = ("lora", "melora", "loramoe")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, checkpoints, cache_dir) -> dict[str, Path]:
    """Smoke runs on the tiny hub Llama (evaluation generates there, so predictions.jsonl holds
    greedy outputs), one per variant."""
    from moe_lora.cli import main

    root = tmp_path_factory.mktemp("use_runs")
    hub = ["model.source=hub", f"model.name_or_path={checkpoints['llama']}", f"cache_dir={cache_dir}"]
    hub.append("recipe.eval_limit=6")  # a few prompts per set: evaluation generates on this model
    for adapter in VARIANTS:
        args = [
            "train",
            f"adapter={adapter}",
            *TINY,
            f"recipe.threads={THREADS}",
            *hub,
            f"hydra.run.dir={root / adapter}",
        ]
        assert main(args) == 0
    return {a: root / a for a in VARIANTS}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    from moe_lora.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def generate_file(capsys, run: Path, rows: list[dict], prompts: Path, *flags: str) -> list[dict]:
    """``moe-lora generate run --file prompts --jsonl`` over the rows' prompts: its JSON lines."""
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    code, out, err = cli(capsys, "generate", str(run), "--file", str(prompts), "--jsonl", *flags)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61], [11, 12, 13, 14, 15, 16, 17, 18]])


def test_generate_reproduces_the_stored_greedy_predictions(runs, capsys, tmp_path) -> None:
    for variant in ("lora", "loramoe"):
        rows = [r for r in read_jsonl(runs[variant] / "predictions.jsonl") if r["model"] == "tuned"]
        tuned = [r for r in rows if r["task"] == "cbqa"][:6] + [r for r in rows if r["task"] == "instruction"][:6]
        got = generate_file(capsys, runs[variant], tuned, tmp_path / f"{variant}.jsonl")
        assert [g["prompt"] for g in got] == [r["prompt"] for r in tuned]
        assert [g["completion"] for g in got] == [r["prediction"] for r in tuned]
        assert len({r["prediction"] for r in tuned}) > 1  # not one constant string


def test_routes_table_and_heatmap(runs, capsys, tmp_path) -> None:
    prompt = read_jsonl(runs["loramoe"] / "predictions.jsonl")[0]["prompt"]
    args = ("--prompt", prompt, "--max-new-tokens", "5", "--no-stop", "--routes", "--routes-dir", str(tmp_path))
    code, out, err = cli(capsys, "generate", str(runs["loramoe"]), *args)
    assert code == 0, err
    table = out.split("per layer):\n")[1].splitlines()
    assert table[0].split() == ["token", "L0", "L1"]
    rows = [line.split() for line in table[1:6]]
    assert all(0 <= int(r[-1]) < 8 and 0 <= int(r[-2]) < 8 for r in rows)  # soft routing: the top expert
    assert (tmp_path / "routes-1.png").stat().st_size > 1000
    code, out, _ = cli(capsys, "generate", str(runs["lora"]), *args)
    assert code == 0 and "has no routers" in out


@pytest.mark.parametrize("variant", ["lora", "melora"])
def test_merged_export_is_a_plain_checkpoint_with_the_adapted_logits(runs, capsys, tmp_path, variant) -> None:
    from transformers import AutoModelForCausalLM

    import moe_lora

    out = tmp_path / "merged"
    code, _, err = cli(capsys, "export", str(runs[variant]), "--format", "merged", "--out", str(out))
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted, _ = moe_lora.load(runs[variant])
    base = AutoModelForCausalLM.from_pretrained(read_name(runs[variant])).eval()
    expected = logits(adapted, IDS)
    assert torch.allclose(logits(merged, IDS), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(base, IDS), expected, atol=1e-4)  # the adapter changed the model


@pytest.mark.parametrize("variant", ["lora", "melora"])
def test_peft_export_loads_with_peft_and_matches(runs, capsys, tmp_path, variant) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import moe_lora

    out = tmp_path / "peft"
    code, _, err = cli(capsys, "export", str(runs[variant]), "--format", "peft", "--out", str(out))
    assert code == 0, err
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(meta["base_model_name_or_path"]).eval()
    before = logits(base, IDS)
    theirs = PeftModel.from_pretrained(base, out).eval()
    adapted, _ = moe_lora.load(runs[variant])
    expected = logits(adapted, IDS)
    assert torch.allclose(logits(theirs, IDS), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, expected, atol=1e-4)
    if variant == "melora":  # n minis of rank r: one LoRA of rank n*r
        assert meta["r"] == 8


def test_moe_lora_export_loads_without_the_run(runs, capsys, tmp_path) -> None:
    import moe_lora

    run = tmp_path / "run"
    shutil.copytree(runs["loramoe"], run)
    out = tmp_path / "export"
    code, _, err = cli(capsys, "export", str(run), "--format", "moe_lora", "--out", str(out))
    assert code == 0, err
    shutil.rmtree(run)
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["format"] == "moe_lora" and meta["variant"] == "loramoe" and meta["targets"] == ["ffn"]
    assert len(meta["adapted_modules"]) == 6 and meta["layout"]["per_layer"][0]["num_experts"] == 8
    assert meta["base_model"]["source"] == "hub" and meta["config"]["adapter"]["name"] == "loramoe"
    card = (out / "README.md").read_text()
    assert "CBQA EM" in card and "model.layers.0.mlp.gate_proj" in card  # metrics and routing summary
    exported, _ = moe_lora.load(out)
    original, _ = moe_lora.load(runs["loramoe"])
    assert torch.equal(logits(exported, IDS), logits(original, IDS))
    assert moe_lora.aux_loss(exported) > 0  # LoRAMoE's LBC of that forward


def one_line_error(capsys, *args: str) -> str:
    code, _, err = cli(capsys, *args)
    lines = [line for line in err.split("\n") if line and "\r" not in line]  # not transformers' loading bar
    assert code == 2 and len(lines) == 1 and lines[0].startswith("moe-lora: error:"), err
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(runs, capsys, tmp_path, monkeypatch) -> None:
    import moe_lora
    from moe_lora.errors import ConfigError

    out = tmp_path / "out"
    err = one_line_error(capsys, "export", str(runs["loramoe"]), "--format", "merged", "--out", str(out))
    assert "depends on the input" in err and not out.exists()
    err = one_line_error(capsys, "export", str(runs["loramoe"]), "--format", "peft", "--out", str(out))
    assert "depends on the input" in err and not out.exists()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs["lora"] / "config.yaml", unfinished)
    err = one_line_error(capsys, "export", str(unfinished), "--format", "moe_lora", "--out", str(out))
    assert "adapter_model.safetensors" in err and not out.exists()
    with pytest.raises(ConfigError, match=r"adapter_model\.safetensors"):
        moe_lora.load(unfinished)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = one_line_error(
        capsys, "export", str(runs["lora"]), "--format", "peft", "--out", str(out), "--push-to-hub", "me/x"
    )
    assert "HF_HUB_OFFLINE" in err and not out.exists()
    # an existing --out: refused without --overwrite; with it, replaced only if an export made it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    err = one_line_error(capsys, "export", str(runs["lora"]), "--format", "peft", "--out", str(mine))
    assert "--overwrite" in err
    err = one_line_error(capsys, "export", str(runs["lora"]), "--format", "peft", "--out", str(mine), "--overwrite")
    assert "not written by moe-lora export" in err and (mine / "notes.txt").read_text() == "keep"
    assert cli(capsys, "export", str(runs["lora"]), "--format", "peft", "--out", str(out))[0] == 0
    assert cli(capsys, "export", str(runs["melora"]), "--format", "peft", "--out", str(out), "--overwrite")[0] == 0
    replaced = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert all(t.endswith(("q_proj", "v_proj")) for t in replaced)  # melora's targets, not lora's
    # a base that is not available offline names model.name_or_path
    moved = tmp_path / "moved"
    shutil.copytree(runs["lora"], moved, ignore=shutil.ignore_patterns("checkpoints"))
    text = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(
        text.replace(f"name_or_path: {read_name(runs['lora'])}", "name_or_path: nobody/no-such-model")
    )
    with pytest.raises(ConfigError, match=r"model\.name_or_path='nobody/no-such-model'"):
        moe_lora.load(moved)
    err = one_line_error(capsys, "generate", str(runs["lora"]), "--prompt", "hi", "--chat-template")
    assert "has none" in err  # the tiny Llama's tokenizer has no chat template
    for command in ("generate", "export"):
        with pytest.raises(SystemExit) as exit_:
            cli(capsys, command, "--help")
        assert exit_.value.code == 0 and f"moe-lora {command}" in capsys.readouterr().out


def read_name(run: Path) -> str:
    return json.loads((run / "results.json").read_text())["config"]["model"]["name_or_path"]


def test_add_adapter_trains_inside_hf_trainer_with_the_aux_loss(checkpoints, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    import moe_lora
    from moe_lora.errors import ConfigError

    tok = AutoTokenizer.from_pretrained(checkpoints["llama"])
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    moe_lora.add_adapter(model, "loramoe", num_experts=4, rank=4, target_modules=["ffn"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    texts = [f"the {w} is number {i}" for i, w in enumerate(["cat", "dog", "sun", "sea", "tree", "car", "hat", "cup"])]
    rows = []
    for i, t in enumerate(texts):
        enc = tok(t, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
        ids, mask = enc["input_ids"][0], enc["attention_mask"][0]
        rows.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100), "task_type": i % 2}
        )
    seen: list[tuple[float, float]] = []

    class AuxTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            out = model(**inputs)
            aux = moe_lora.aux_loss(model)
            seen.append((float(out.loss), float(aux)))
            assert aux.requires_grad
            loss = out.loss + aux
            return (loss, out) if return_outputs else loss

    def collate(batch):
        return {k: torch.stack([torch.as_tensor(r[k]) for r in batch]) for k in batch[0]}

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    AuxTrainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
    assert len(seen) == 4 and all(aux > 0 and torch.isfinite(torch.tensor(aux)) for _, aux in seen)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(("lora_A", "lora_B", "router.weight")) for n in changed)
    assert any(n.endswith("router.weight") for n in changed)
    stats = moe_lora.routing_stats(model)
    assert len(stats) == 6 and {"cbqa", "instruction", "all"} <= set(next(iter(stats.values())))
    assert all(s["all"]["cv"] > 0 for s in stats.values())
    with pytest.raises(ConfigError, match="depends on the input"):
        moe_lora.merge(model)


WORLD_VARIANTS = ("lora", "melora", "loramoe", "mov")
WORLD_MATCH = {"cbqa": "nq_open", "instruction": "exact"}  # data/mixture.py: the world's sets


@pytest.fixture(scope="module")
def world_runs(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """Smoke runs on the built-in world model, one per variant (the runner without Hydra's job
    machinery: seconds less each). Evaluation scores exact match by teacher forcing there and
    generates the wrong examples' predictions."""
    from moe_lora.recipes.compose import load_config
    from moe_lora.recipes.runner import run

    root = tmp_path_factory.mktemp("world_runs")
    for adapter in WORLD_VARIANTS:
        (root / adapter).mkdir()
        cfg = load_config([f"adapter={adapter}", *TINY, f"cache_dir={cache_dir}", "recipe.eval_limit=4"])
        assert run(cfg, root / adapter, progress=False) is not None
    return {a: root / a for a in WORLD_VARIANTS}


@pytest.mark.parametrize("variant", WORLD_VARIANTS)
def test_on_the_built_in_world_generate_reproduces_every_stored_prediction(world_runs, capsys, tmp_path, variant):
    """Right and wrong alike: a wrong example's prediction is what greedy decoding writes, not the
    teacher-forced arg-max tokens; and each record's ``correct`` is its prediction matched by the
    set's rule (teacher-forced exact match equals greedy exact match)."""
    from moe_lora.eval.normalize import MATCHERS

    run = world_runs[variant]
    rows = read_jsonl(run / "predictions.jsonl")
    tuned = [r for r in rows if r["model"] == "tuned"]
    got = [g["completion"] for g in generate_file(capsys, run, tuned, tmp_path / "prompts.jsonl")]
    assert got == [r["prediction"] for r in tuned]
    assert {"cbqa", "instruction"} <= {r["task"] for r in tuned if not r["correct"]}  # generated in both sets
    assert len({r["prediction"] for r in tuned}) > 1
    assert all(MATCHERS[WORLD_MATCH[r["task"]]](r["prediction"], r["answers"]) == r["correct"] for r in rows)


def test_on_the_built_in_world_base_predictions_are_the_base_models_greedy_output(world_runs) -> None:
    """``moe-lora generate`` runs the adapted model only; the base's stored predictions are checked
    with evaluation's greedy generation on the run's base (the same for every variant)."""
    from moe_lora.eval.generate import greedy_generate
    from moe_lora.recipes.api import load_base, read_saved

    run = world_runs["lora"]
    cfg = read_saved(run).cfg
    model, tok = load_base(cfg)
    base = [r for r in read_jsonl(run / "predictions.jsonl") if r["model"] == "base"]
    got = greedy_generate(
        model, tok, [r["prompt"] for r in base], max_new_tokens=cfg.eval.max_new_tokens, stop=("\n",), batch_size=7
    )
    assert got == [r["prediction"] for r in base] and not all(r["correct"] for r in base)


def test_routes_of_mov_on_the_built_in_world(world_runs, capsys, tmp_path) -> None:
    """MoV's per-head routers are traced."""
    run = world_runs["mov"]
    prompt = read_jsonl(run / "predictions.jsonl")[0]["prompt"]
    code, out, err = cli(capsys, "generate", str(run), "--prompt", prompt, "--routes", "--routes-dir", str(tmp_path))
    assert code == 0 and out.split("per layer):\n")[1].split()[:3] == ["token", "L0", "L1"], err


@pytest.mark.parametrize(
    ("family", "variant"), [("gpt2", "lora"), ("gpt2", "ia3"), ("llama", "ia3"), ("llama", "alora")]
)
def test_merge_and_peft_of_an_added_adapter(checkpoints, tmp_path, family, variant) -> None:
    """GPT-2's Conv1D stores weights transposed; IA3 by role on GPT-2 scales only the key and value
    columns of the fused c_attn (no peft form); ALoRA's pruned components drop out of its peft rank.
    Merged and peft logits equal the adapted model's."""
    from types import SimpleNamespace

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import moe_lora
    from moe_lora.errors import ConfigError
    from moe_lora.recipes.export import write_peft

    path = checkpoints[family]
    targets = ["key", "value", "ffn_out"] if variant == "ia3" else ["attention", "ffn"]
    model = moe_lora.add_adapter(AutoModelForCausalLM.from_pretrained(path), variant, target_modules=targets).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # away from the identity init, so that a wrong axis or site shows
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("adapter_active"):  # ALoRA: one component pruned, one granted
                b[0], b[-1] = 0.0, 1.0
    ids = IDS % model.config.vocab_size
    expected = logits(model, ids)
    cfg = SimpleNamespace(
        adapter=SimpleNamespace(name=variant, dropout=0.0),
        model=SimpleNamespace(source="hub", name_or_path=str(path), gguf_file=None),
    )
    if (family, variant) == ("gpt2", "ia3"):
        with pytest.raises(ConfigError, match="fused linear"):
            write_peft(model, cfg, tmp_path)
    else:
        write_peft(model, cfg, tmp_path)
        meta = json.loads((tmp_path / "adapter_config.json").read_text())
        assert meta["fan_in_fan_out"] is (family == "gpt2")
        if variant == "alora":  # rank 8 active of max_rank 16, one moved: still 8 per module
            assert meta["r"] == 8 and meta["lora_alpha"] == 16
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path).eval()
        assert torch.allclose(logits(theirs, ids), expected, atol=1e-5, rtol=1e-5)
    assert moe_lora.merge(model) is model and not hasattr(model, "_moe_lora")
    assert not any("base" in n.split(".") or "ia3" in n or "lora" in n for n, _ in model.named_parameters())
    assert torch.allclose(logits(model, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_generate_uses_the_chat_template_as_the_run_did(checkpoints, cache_dir, tmp_path, capsys) -> None:
    """A run trained with data.chat_template=true (the tiny Qwen2's template): generate formats
    prompts the same way and reproduces the stored greedy predictions."""
    run = tmp_path / "chat"
    hub = ["model.source=hub", f"model.name_or_path={checkpoints['qwen2']}", "data.chat_template=true"]
    args = ["train", "adapter=lora", *TINY, f"recipe.threads={THREADS}", *hub, "recipe.eval_limit=4"]
    assert cli(capsys, *args, f"cache_dir={cache_dir}", f"hydra.run.dir={run}")[0] == 0
    tuned = [r for r in read_jsonl(run / "predictions.jsonl") if r["model"] == "tuned"]
    prompts = tmp_path / "prompts.jsonl"
    got = [g["completion"] for g in generate_file(capsys, run, tuned, prompts)]
    assert got == [r["prediction"] for r in tuned]
    plain = generate_file(capsys, run, tuned, prompts, "--no-chat-template")
    assert [g["completion"] for g in plain] != got


def test_stop_strings_typed_with_escapes_mean_the_characters() -> None:
    from moe_lora.recipes.use import generate_parser, unescape

    args = generate_parser().parse_args(["run", "--prompt", "p", "--stop", r"\n", "--stop", "."])
    assert [unescape(s) for s in args.stop] == ["\n", "."] and unescape(r"a\tb") == "a\tb"
