"""Real-data sources on fixture datasets in the hub schemas: resolution, field mappings, lm-eval
prompts, sampling, one-line errors, and the scripts/prepare_data.py path with a fake loader."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_lora.config import DataConfig, SourceConfig
from moe_lora.data.sources import check_sources, resolve_source, source_mixture, train_counts
from moe_lora.data.templates import TEMPLATES, fewshot_prompt, get_template, render
from moe_lora.errors import ConfigError
from moe_lora.recipes.compose import CONF_DIR

SOURCES = sorted(p.stem for p in (CONF_DIR / "source").glob("*.yaml"))


def source(name: str, **override) -> SourceConfig:
    """conf/source/<name>.yaml as a validated SourceConfig (its schema default is the dataclass)."""
    node = OmegaConf.load(CONF_DIR / "source" / f"{name}.yaml")
    node.pop("defaults")
    merged = OmegaConf.merge(OmegaConf.structured(SourceConfig), node, override)
    return OmegaConf.to_object(merged)


def data(root: Path | None, num_train: int = 40, **sources: SourceConfig) -> DataConfig:
    return DataConfig(name="test", sources=sources, root=None if root is None else str(root), num_train=num_train)


# ---------------------------------------------------------------------------------------- resolution
def test_root_is_checked_before_the_local_path(data_root: Path) -> None:
    jsonl = data_root / "_files" / "nq_open"
    src = source("nq_open", path=str(jsonl))
    assert resolve_source("nq_open", src, str(data_root)).location == str(data_root / "nq_open")
    found = resolve_source("nq_open", src, None)
    assert (found.kind, found.location) == ("files", str(jsonl))
    assert resolve_source("nq_open", src, str(data_root / "_files")).kind == "files"  # <root>/<name> is data files


@pytest.mark.parametrize("name", SOURCES)
def test_every_builtin_source_yields_examples_of_its_task_type(data_root: Path, name: str) -> None:
    src = source(name)
    mix = source_mixture(data(data_root, **{name: src}), seed=0)
    assert len(mix.train) == 40 and {e.task_type for e in mix.train} == {src.task_type}
    assert {e.subtask for e in mix.train} == {name}
    assert all(e.answer.strip() and e.id for e in mix.train)
    evalset = mix.eval[name]
    assert evalset.examples and evalset.task_type == src.task_type
    assert evalset.metric == ("generate" if src.task_type == "cbqa" else "response_loss")
    assert mix.info["sources"][name]["train"] == 40 and mix.info["sources"][name]["eval"] == len(evalset.examples)
    if src.task_type == "cbqa":
        assert all(e.answer in e.aliases for e in mix.train)
        assert evalset.match == src.match and evalset.stop == ("\n", ".", ",")


def test_triviaqa_targets_aliases_and_ids(data_root: Path) -> None:
    mix = source_mixture(data(data_root, triviaqa=source("triviaqa")), seed=0)
    paris = next(e for e in mix.train + mix.eval["triviaqa"].examples if e.answer == "Paris")
    assert paris.prompt == "Question: What is the capital of France??\nAnswer:"  # lm-eval appends '?' too
    assert paris.aliases == ("Paris", "Paris, France") and paris.id == "tc_0"


def test_instruction_prompts_follow_alpaca_and_gsm8k(data_root: Path) -> None:
    sources = {"alpaca": source("alpaca"), "gsm8k": source("gsm8k"), "dolly": source("dolly")}
    mix = source_mixture(data(data_root, 150, **sources), seed=0)  # 50 each: every row at least once
    from datasets import load_from_disk

    texts = set(load_from_disk(str(data_root / "alpaca"))["train"]["text"])
    alpaca = [e for e in mix.train if e.subtask == "alpaca"]
    assert all(e.prompt + e.answer in texts for e in alpaca)  # the dataset's own `text` column
    assert any("### Input:" in e.prompt for e in alpaca) and any("### Input:" not in e.prompt for e in alpaca)
    dolly = next(e for e in mix.train if e.subtask == "dolly" and e.answer == "god")
    assert "### Input:\ndog\n\n### Response:\n" in dolly.prompt  # context as input
    gsm = next(e for e in mix.train if e.subtask == "gsm8k")
    assert gsm.prompt.startswith("Question: Tom has") and gsm.prompt.endswith("apples does he have?\nAnswer:")
    assert "<<" in gsm.answer and "\n#### " in gsm.answer  # trained on the whole worked answer


# -------------------------------------------------------------------------------- lm-eval's prompts
def test_fewshot_prompts_equal_lm_evals() -> None:
    """Rendered as lm-eval's fewshot_context renders tasks/triviaqa/default.yaml and nq_open.yaml."""
    shots = [({"question": "Who wrote Hamlet?"}, "Shakespeare"), ({"question": "What is 2+2?"}, "4")]
    query = {"question": "Which planet do we live on?"}
    assert fewshot_prompt(TEMPLATES["triviaqa"], query, shots) == (
        "Question: Who wrote Hamlet??\nAnswer: Shakespeare\n\n"
        "Question: What is 2+2??\nAnswer: 4\n\n"
        "Question: Which planet do we live on??\nAnswer:"
    )
    nq_shots = [({"question": "who wrote hamlet"}, "shakespeare"), ({"question": "what is 2+2"}, "4")]
    assert fewshot_prompt(TEMPLATES["nq_open"], {"question": "which planet do we live on"}, nq_shots) == (
        "Answer these questions:\n\nQ: who wrote hamlet?\nA: shakespeare\nQ: what is 2+2?\nA: 4\n"
        "Q: which planet do we live on?\nA:"
    )
    assert fewshot_prompt(TEMPLATES["nq_open"], {"question": "x"}) == "Answer these questions:\n\nQ: x?\nA:"


def test_fewshot_eval_sets_draw_fixed_shots_from_the_train_split(data_root: Path) -> None:
    cfg = data(data_root, triviaqa=source("triviaqa"), nq_open=source("nq_open"))
    first = source_mixture(cfg, seed=0, num_fewshot=2, eval_limit=3)
    other_seed = source_mixture(cfg, seed=1, num_fewshot=2, eval_limit=3)
    nq = first.eval["nq_open"].examples
    assert len(nq) == 3 and nq == other_seed.eval["nq_open"].examples  # shots do not depend on the run seed
    assert nq[0].prompt.startswith("Answer these questions:\n\nQ: ") and nq[0].prompt.count("\nA:") == 3
    trivia = first.eval["triviaqa"].examples[0].prompt
    assert trivia.count("Question: ") == 3 and trivia.endswith("Question: Which river flows through London??\nAnswer:")
    train_questions = {r.split("?")[0] for r in trivia.split("Question: ")[1:3]}
    from tests.fixtures.datasets import FACTS

    assert train_questions <= {q for q, _, _ in FACTS[:22]}


def test_format_string_template_and_unknown_template() -> None:
    tmpl = get_template("Q: {question}\nA:")
    assert render(tmpl, {"question": "why"}) == "Q: why\nA:"
    with pytest.raises(ConfigError, match=r"^data.sources.x.template='nope' is neither"):
        get_template("nope", "data.sources.x.template")


# --------------------------------------------------------------------------------------- sampling
def test_sampling_is_deterministic_by_seed_and_weights_split_num_train(data_root: Path) -> None:
    cfg = data(data_root, 50, triviaqa=source("triviaqa", weight=1.0), alpaca=source("alpaca", weight=4.0))
    assert train_counts(cfg) == {"triviaqa": 10, "alpaca": 40}
    a, b, c = (source_mixture(cfg, seed=s) for s in (0, 0, 1))
    assert a.train == b.train and a.train != c.train
    assert a.info["train"] == {"cbqa": 10, "instruction": 40}
    assert a.validation == c.validation and {e.task_type for e in a.validation[:2]} == {"cbqa", "instruction"}
    held = {e.id for e in a.validation}
    assert not held & {e.id for e in a.train + c.train}  # validation rows never train


def test_num_examples_wins_over_weight_and_counts_add_up() -> None:
    cfg = data(
        None,
        10,
        a=source("triviaqa", weight=1.0),
        b=source("nq_open", weight=2.0),
        c=source("alpaca", num_examples=7),
        d=source("gsm8k", split=None, eval_split="test"),
    )
    assert train_counts(cfg) == {"a": 3, "b": 7, "c": 7}  # 10 split 1:2 by largest remainder, plus 7


# ----------------------------------------------------------------------------------- data files
def test_jsonl_and_parquet_sources(data_root: Path) -> None:
    files = data_root / "_files"
    cfg = data(
        None,
        20,
        nq=source("nq_open", path=str(files / "nq_open")),
        webqs=source("web_questions", path=str(files / "web_questions")),
    )
    check_sources(cfg)
    mix = source_mixture(cfg, seed=0)
    assert {e.subtask for e in mix.train} == {"nq", "webqs"}
    assert mix.eval["webqs"].examples[0].answer == "Thames"  # parquet test split
    single = data(None, 5, nq=source("nq_open", path=str(files / "nq_open" / "train.jsonl"), eval_split=None))
    assert len(source_mixture(single, seed=0).train) == 5  # a single file is its train split


# ------------------------------------------------------------------------------------------ errors
def _one_line_error(cfg: DataConfig) -> str:
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        check_sources(cfg)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_source_names_the_key(tmp_path: Path) -> None:
    message = _one_line_error(data(tmp_path, triviaqa=source("triviaqa")))
    assert message.startswith("data.sources.triviaqa.path='mandarjoshi/trivia_qa' not found")
    assert str(tmp_path / "triviaqa") in message and "prepare_data.py" in message
    local = _one_line_error(data(None, x=source("nq_open", path=str(tmp_path / "nope.jsonl"))))
    assert local.startswith("data.sources.x.path=") and "not a local file or folder" in local


def test_hub_ids_come_from_the_datasets_cache(monkeypatch, tmp_path: Path) -> None:
    """Third in line: a hub id loaded by ``datasets`` (offline: only what its cache holds)."""
    from datasets import Dataset, DatasetDict

    import moe_lora.data.sources as sources

    cached = DatasetDict({"train": Dataset.from_list([{"question": "q", "answer": ["a"]}])})
    monkeypatch.setattr(sources, "_load", lambda kind, location, config: cached)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))  # the cache folders datasets writes
    for folder in ("google-research-datasets___nq_open", "mandarjoshi___trivia_qa"):
        (tmp_path / "cache" / folder).mkdir(parents=True)
    found = resolve_source("nq_open", source("nq_open"), str(tmp_path))
    assert (found.kind, found.location) == ("hub", "google-research-datasets/nq_open")

    def wrong_config(kind: str, location: str, config: str | None) -> None:
        raise ValueError(f"BuilderConfig '{config}' not found. Available: ['rc', 'rc.nocontext']")

    monkeypatch.setattr(sources, "_load", wrong_config)
    with pytest.raises(ConfigError, match=r"^data.sources.triviaqa.config='rc.nocontxt' is not a config"):
        resolve_source("triviaqa", source("triviaqa", config="rc.nocontxt"), None)


def test_wrong_field_names_the_field_and_the_columns(data_root: Path) -> None:
    bad = source("triviaqa", fields={"answers": "answer.valeu"})
    message = _one_line_error(data(data_root, triviaqa=bad))
    assert message.startswith("data.sources.triviaqa.fields.answers=answer.valeu is not a column")
    assert "answer.value" in message and "question_id" in message
    unmapped = dataclasses.replace(source("dolly"), fields={"instruction": "instruction"})  # dolly has no `output`
    assert _one_line_error(data(data_root, dolly=unmapped)).startswith("data.sources.dolly.fields has no 'output'")


def test_wrong_split_names_the_split(data_root: Path) -> None:
    message = _one_line_error(data(data_root, web_questions=source("web_questions", eval_split="validation")))
    assert message.startswith("data.sources.web_questions.eval_split='validation'") and "train, test" in message


# ------------------------------------------------------------------------------ prepare_data.py
def test_prepare_data_saves_atomically_and_skips_existing(tmp_path: Path, capsys) -> None:
    from datasets import Dataset, DatasetDict, load_from_disk

    from scripts.prepare_data import prepare

    calls = []

    def fake(path: str, config: str | None) -> DatasetDict:
        calls.append((path, config))
        return DatasetDict({"train": Dataset.from_list([{"question": "q", "answer": ["a"]}])})

    sources = {"nq_open": source("nq_open"), "triviaqa": source("triviaqa")}
    (tmp_path / "triviaqa").mkdir()
    written = prepare(sources, tmp_path, load=fake)
    assert written == [tmp_path / "nq_open"] and calls == [("google-research-datasets/nq_open", None)]
    assert load_from_disk(str(tmp_path / "nq_open"))["train"][0]["answer"] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nq_open", "triviaqa"]  # no temp folder left
    assert "skip   triviaqa" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ through the CLI
def test_data_configs_validate_against_a_prepared_root(data_root: Path, checkpoints) -> None:
    from moe_lora.recipes.compose import load_config

    for name in ("cbqa_instruct_hub", "triviaqa_alpaca"):  # validate() runs check_sources
        cfg = load_config(
            [f"data={name}", f"data.root={data_root}", "model=gpt2", f"model.name_or_path={checkpoints['gpt2']}"]
        )
        assert cfg.data.sources and all(s.split for s in cfg.data.sources.values())


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.sources.triviaqa.fields.answers=answer.valeu", "data.sources.triviaqa.fields.answers=answer.valeu"),
        ("data.sources.alpaca.eval_split=test", "data.sources.alpaca.eval_split='test'"),
    ],
)
def test_cli_stops_with_one_line_naming_the_key(run_cli, data_root: Path, override: str, key: str) -> None:
    code, out, err = run_cli("train", "data=triviaqa_alpaca", f"data.root={data_root}", override, tiny=False)
    assert code == 2 and err.startswith(f"moe-lora: error: {key}") and err.count("\n") == 1
    assert "Traceback" not in out + err


def test_disk_metadata_gives_the_same_columns_as_datasets(data_root) -> None:
    """check_sources reads save_to_disk folders from their JSON metadata (no datasets import):
    the columns must be exactly what datasets itself reports, for every fixture split."""
    from moe_lora.data.sources import column_paths, disk_columns, resolve_source, select_split
    from moe_lora.recipes.compose import load_config

    cfg = load_config(["data=cbqa_instruct_hub", "model=gpt2"], check_files=False)
    for name, src in cfg.data.sources.items():
        resolved = resolve_source(name, src, str(data_root))
        for spec in (src.split, src.eval_split):
            if spec is not None:
                fast = disk_columns(resolved, spec, "k")
                assert fast == column_paths(select_split(resolved.load(), spec, "k").features), (name, spec)


def test_uncached_hub_dataset_fails_without_importing_datasets(monkeypatch) -> None:
    import sys

    from moe_lora.config import SourceConfig
    from moe_lora.data.sources import resolve_source

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it would fail the test
    with pytest.raises(ConfigError, match=r"data\.sources\.tq\.path='nobody/no-such-set' not found"):
        resolve_source("tq", SourceConfig(path="nobody/no-such-set"), None)
