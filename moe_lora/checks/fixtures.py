"""Offline stand-ins for a hub checkpoint and hub datasets, for the GPU check (:mod:`.gpu_check`).

A machine with no internet has neither LLaMA-2 nor TriviaQA; what the check needs is their *shape*:
a random-weight Llama saved with ``save_pretrained`` (its architecture from ``conf/model/``) with a
Llama-style BPE tokenizer trained here with ``tokenizers``, and ``<root>/<source>`` folders in the
hub schemas that ``data=cbqa_instruct_hub`` reads (TriviaQA ``rc.nocontext``, NQ-open,
Alpaca-cleaned), written with ``save_to_disk`` as ``scripts/prepare_data.py`` writes them.
tests/fixtures builds the test suite's sources from the same facts and tasks (the package cannot
import tests/).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from moe_lora.bench.run import model_shape
from moe_lora.data.sources import quiet
from moe_lora.model.load import arch_config

FACTS = [  # (question stem, answer, other aliases)
    ("What is the capital of France", "Paris", ["Paris, France"]),
    ("What is the capital of Italy", "Rome", ["Roma"]),
    ("What is the capital of Spain", "Madrid", []),
    ("What is the capital of Japan", "Tokyo", ["Tokio"]),
    ("What colour is the sky on a clear day", "Blue", ["Light blue"]),
    ("What colour is grass", "Green", []),
    ("How many legs does a spider have", "Eight", ["8"]),
    ("How many days are in a week", "Seven", ["7"]),
    ("Which animal says moo", "Cow", ["Cattle"]),
    ("Which animal barks", "Dog", ["Hound"]),
    ("What is frozen water called", "Ice", []),
    ("Which planet do we live on", "Earth", ["The Earth", "Planet Earth"]),
    ("What is the largest ocean", "Pacific Ocean", ["Pacific"]),
    ("Who wrote Hamlet", "William Shakespeare", ["Shakespeare"]),
    ("What gas do plants take in", "Carbon dioxide", ["CO2"]),
    ("What is the opposite of hot", "Cold", []),
    ("Which fruit is yellow and curved", "Banana", ["Bananas"]),
    ("What do bees make", "Honey", []),
    ("How many hours are in a day", "Twenty-four", ["24"]),
    ("What is the first letter of the alphabet", "A", []),
    ("Which star is closest to the Earth", "The Sun", ["Sun"]),
    ("What is the capital of Germany", "Berlin", []),
    ("Which river flows through London", "Thames", ["The Thames", "River Thames"]),
    ("What is the capital of Egypt", "Cairo", []),
    ("Which month comes after January", "February", ["Feb"]),
    ("What is two plus two", "Four", ["4"]),
    ("Which bird is a symbol of peace", "Dove", ["White dove"]),
    ("What is the capital of Canada", "Ottawa", []),
    ("Which metal is liquid at room temperature", "Mercury", ["Hg", "Quicksilver"]),
    ("How many continents are there", "Seven", ["7"]),
]
TASKS = [  # (instruction, input, output)
    ("Give the opposite of the word.", "up", "down"),
    ("Give the opposite of the word.", "big", "small"),
    ("Write the word in capital letters.", "cat", "CAT"),
    ("Write the word in capital letters.", "sun", "SUN"),
    ("Name a colour.", "", "Red."),
    ("Name a fruit.", "", "An apple."),
    ("Count from one to three.", "", "One, two, three."),
    ("Reverse the letters.", "dog", "god"),
    ("Reverse the letters.", "star", "rats"),
    ("Say hello politely.", "", "Hello, nice to meet you."),
    ("Add the two numbers.", "2 and 3", "5"),
    ("Add the two numbers.", "4 and 4", "8"),
]
CORPUS = [
    "Question: Who wrote the novel about the white whale?\nAnswer: Herman Melville",
    "Q: what is the capital city of france?\nA: paris",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nGive three tips for staying healthy.\n\n### Input:\n\n### Response:\nEat well, sleep, move.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 , . ? ! : ; ' \" ( ) - #",
]
LLAMA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def llama_tokenizer(vocab_size: int = 400):
    """A SentencePiece-style BPE like Llama-2's tokenizer.json (``▁`` for spaces, BOS prepended),
    so prompts, stop strings and padding go through the same code as with the real one."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.Split("▁", behavior="merged_with_next")]
    )
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    text = CORPUS + [f"{q}? {a}" for q, a, _ in FACTS] + [" ".join(t) for t in TASKS]
    alphabet = sorted({chr(c) for c in range(32, 127)} | {"\n", "▁"} | {c for t in text for c in t})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(LLAMA_SPECIALS.values()), initial_alphabet=alphabet
    )
    tok.train_from_iterator(text * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **LLAMA_SPECIALS)


def save_llama_checkpoint(
    path: Path, model_name: str, dtype: torch.dtype, device: str, seed: int = 0, **shape: int
) -> Path:
    """A random-weight checkpoint shaped like ``conf/model/<model_name>.yaml`` (``shape``: fields
    of its ModelConfig to change, e.g. ``num_layers=2``), with :func:`llama_tokenizer`, saved with
    ``save_pretrained`` in ``dtype``. Weights are drawn on ``device`` (a 7B shape: seconds on a GPU,
    minutes on a CPU); the embedding keeps the config's vocabulary, the tokenizer uses its first rows."""
    cfg = replace(model_shape(model_name), **shape)
    tok = llama_tokenizer()
    vocab = max(cfg.vocab_size or 0, len(tok))
    config = arch_config(cfg, vocab)
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    config.pad_token_id = None
    config.max_position_embeddings = max(getattr(config, "max_position_embeddings", 0) or 0, 2048)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return path


def triviaqa_row(i: int, question: str, answer: str, aliases: list[str]) -> dict:
    """TriviaQA ``rc.nocontext``: contexts are empty lists, the answer a struct with aliases."""
    every = [answer, *aliases]
    return {
        "question": question + "?",
        "question_id": f"tc_{i}",
        "question_source": "http://www.fixture-quiz.example/",
        "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
        "search_results": {"description": [], "filename": [], "rank": [], "title": [], "url": [], "search_context": []},
        "answer": {
            "aliases": every,
            "normalized_aliases": [a.lower() for a in every],
            "matched_wiki_entity_name": "",
            "normalized_matched_wiki_entity_name": "",
            "normalized_value": answer.lower(),
            "type": "WikipediaEntity",
            "value": answer,
        },
    }


def source_rows(long_words: int = 0, copies: int = 4) -> dict[str, dict[str, list[dict]]]:
    """The three sources of ``data=cbqa_instruct_hub`` as splits of rows in their hub schemas.
    ``long_words``: words appended to every Alpaca output, so that training batches reach
    ``data.max_length`` as real instruction data does (the memory the presets estimate)."""
    filler = " ".join(f"word{i % 97}" for i in range(long_words))
    alpaca = [
        {"instruction": ins, "input": inp, "output": f"{out} {filler}".strip()} for ins, inp, out in TASKS * copies
    ]
    return qa_splits() | {"alpaca": {"train": alpaca}}  # data=cbqa_instruct_hub reads Alpaca-cleaned as sources.alpaca


def qa_splits() -> dict[str, dict[str, list[dict]]]:
    """TriviaQA ``rc.nocontext`` and NQ-open rows of :data:`FACTS`: the first 22 train, the rest validation."""
    trivia = [triviaqa_row(i, q, a, al) for i, (q, a, al) in enumerate(FACTS)]
    nq = [{"question": q.lower(), "answer": [a.lower(), *(x.lower() for x in al)]} for q, a, al in FACTS]
    return {
        "triviaqa": {"train": trivia[:22], "validation": trivia[22:]},
        "nq_open": {"train": nq[:22], "validation": nq[22:]},
    }


def write_sources(root: Path, long_words: int = 0) -> Path:
    """``<root>/<source>`` save_to_disk folders (a ``data.root``); returns ``root``."""
    from datasets import Dataset, DatasetDict

    with quiet():
        for name, splits in source_rows(long_words).items():
            DatasetDict({s: Dataset.from_list(rows) for s, rows in splits.items()}).save_to_disk(str(root / name))
    return root
