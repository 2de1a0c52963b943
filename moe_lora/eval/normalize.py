"""The one home of answer matching: lm-eval's ``triviaqa`` and ``nq_open`` rules, exact equality,
and PopQA's ``contains`` (the real facts: instruction-tuned models answer in sentences).

lm-eval scores a ``generate_until`` task in three steps, reproduced here so that our numbers are
the harness's numbers: (1) the generation is cut at the first ``until`` stop string (done by
:func:`moe_lora.eval.generate.cut_at_stop`, as ``HFLM.generate_until`` does); (2) the task's
``filter_list`` runs: ``remove_whitespace`` strips it and ``take_first`` keeps the only sample;
(3) ``exact_match_hf_evaluate`` with the YAML's kwargs compares it with every target and the
example is correct if any target matches (lm-eval's ``multiple_target`` rule; our targets are the
answer and its aliases).

The two tasks differ only in the kwargs of step (3), copied from
``lm_eval/tasks/triviaqa/default.yaml`` and ``lm_eval/tasks/nq_open/nq_open.yaml`` (v0.4.x):
both ignore case and punctuation; nq_open also deletes articles with its regex (applied before
lower-casing, so it only catches the spellings listed). Neither squeezes inner white space, and
triviaqa keeps articles: "The Beatles" does not match "Beatles" there. A test runs lm-eval's own
filter and metric on the same cases, so any drift fails it.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable, Sequence

# nq_open.yaml, metric_list[0].regexes_to_ignore, verbatim (the duplicated "The " is lm-eval's).
NQ_OPEN_REGEXES: tuple[str, ...] = ("\\b(?:The |the |An |A |The |a |an )",)
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def hf_normalize(
    text: str, *, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False, ignore_punctuation: bool = False
) -> str:
    """One string through ``exact_match_hf_evaluate``'s transformations, in its order (regexes
    first, then case, then punctuation): the same function is applied to prediction and target."""
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(_NO_PUNCTUATION)
    return text


def _any_match(prediction: str, answers: Sequence[str], **kwargs) -> bool:
    pred = hf_normalize(prediction.strip(), **kwargs)  # filter_list: remove_whitespace, take_first
    return any(pred == hf_normalize(a, **kwargs) for a in answers)


def match_triviaqa(prediction: str, answers: Sequence[str]) -> bool:
    """lm-eval ``triviaqa``: case and punctuation ignored, articles and inner spaces kept."""
    return _any_match(prediction, answers, ignore_case=True, ignore_punctuation=True)


def match_nq_open(prediction: str, answers: Sequence[str]) -> bool:
    """lm-eval ``nq_open``: as triviaqa, after deleting the articles its regex lists."""
    return _any_match(prediction, answers, regexes_to_ignore=NQ_OPEN_REGEXES, ignore_case=True, ignore_punctuation=True)


def match_exact(prediction: str, answers: Sequence[str]) -> bool:
    """String equality after stripping: the world's instruction tasks have exact symbol answers."""
    return prediction.strip() in answers


def words(text: str) -> str:
    """Lower-case words without accents or punctuation, single-spaced ("Bogotá, D.C." -> "bogota d c")."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", folded.lower()).split())


def match_contains(prediction: str, answers: Sequence[str]) -> bool:
    """PopQA's rule (Mallen et al. 2023) for instruction-tuned models that answer in sentences
    ("The capital of Syria is Damascus."): correct if an answer occurs in the prediction as whole
    words, case, accents and punctuation ignored. Used by the real facts (``data.facts``)."""
    pred = f" {words(prediction)} "
    return any(f" {a} " in pred for a in map(words, answers) if a)


MATCHERS: dict[str, Callable[[str, Sequence[str]], bool]] = {
    "triviaqa": match_triviaqa,
    "nq_open": match_nq_open,
    "exact": match_exact,
    "contains": match_contains,
}
