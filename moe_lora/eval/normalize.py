"""Answer normalisation of lm-eval's ``nq_open`` / ``triviaqa`` tasks (the SQuAD rules)."""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze white space."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: list[str]) -> bool:
    """Best match over all accepted answers (aliases), after normalisation."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)
