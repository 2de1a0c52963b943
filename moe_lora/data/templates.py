"""Prompt templates of the real sources, copied from where they are defined.

CBQA templates reproduce lm-evaluation-harness's task YAMLs (``tasks/triviaqa/default.yaml``,
``tasks/nq_open/nq_open.yaml``, ``tasks/webqs/webqs.yaml``, ``tasks/gsm8k/gsm8k.yaml``) including
their quirks: triviaqa appends ``?`` to questions that usually end with one already, as lm-eval
does, so scores stay comparable with published harness numbers. A k-shot prompt is built the way
lm-eval's ``fewshot_context`` renders it as plain text: description, then each shot as
``text + target_delimiter + target + fewshot_delimiter``, then the query's text.

Instruction templates are the Stanford Alpaca prompts as they appear in the ``text`` column of
``tatsu-lab/alpaca`` (``### Response:\\n`` then the output), so ``prompt + output == text``.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from moe_lora.errors import ConfigError

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Template:
    """A prompt format over role values (``{question}``, ``{instruction}``, ...).

    ``shot_target`` is the role whose first value answers a few-shot example (lm-eval's
    ``doc_to_target`` takes the first of a list: triviaqa shots answer with ``answer.aliases[0]``).
    ``fallback`` is used instead of ``text`` when the ``optional`` role is empty (Alpaca without
    input)."""

    text: str
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    shot_target: str = "answers"
    optional: str | None = None
    fallback: str | None = None

    @property
    def roles(self) -> set[str]:
        """Roles the template reads; all are required except ``optional``."""
        texts = [self.text] + ([self.fallback] if self.fallback else [])
        return {f for t in texts for _, f, _, _ in string.Formatter().parse(t) if f}

    @property
    def required(self) -> set[str]:
        return self.roles - {self.optional}


TEMPLATES: dict[str, Template] = {
    "triviaqa": Template("Question: {question}?\nAnswer:", shot_target="aliases"),
    "nq_open": Template("Q: {question}?\nA:", description="Answer these questions:\n\n", fewshot_delimiter="\n"),
    "webqs": Template("Question: {question}\nAnswer:"),
    "gsm8k": Template("Question: {question}\nAnswer:", shot_target="output"),
    "alpaca": Template(ALPACA_INPUT, shot_target="output", optional="input", fallback=ALPACA_NO_INPUT),
    # Dolly's ``context`` plays Alpaca's ``input`` (map fields.input=context).
    "dolly": Template(ALPACA_INPUT, shot_target="output", optional="input", fallback=ALPACA_NO_INPUT),
}


def get_template(spec: str, key: str = "template") -> Template:
    """A named template, or a format string over the roles (anything containing ``{``)."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if "{" in spec:
        try:
            Template(spec).roles  # noqa: B018 - parses the format string
        except ValueError as exc:
            raise ConfigError(f"{key}={spec!r} is not a valid format string ({exc})") from None
        return Template(spec)
    raise ConfigError(
        f"{key}={spec!r} is neither a template name ({', '.join(TEMPLATES)}) "
        "nor a format string over the roles (e.g. 'Q: {question}\\nA:')"
    )


def render(template: Template, roles: Mapping[str, str]) -> str:
    """The prompt of one example (no description, no shots)."""
    values = {r: roles.get(r) or "" for r in template.roles}
    if template.fallback and template.optional is not None and not values[template.optional].strip():
        return template.fallback.format_map(values)
    return template.text.format_map(values)


def fewshot_prompt(
    template: Template,
    query: Mapping[str, str],
    shots: Sequence[tuple[Mapping[str, str], str]] = (),
    description: str | None = None,
) -> str:
    """lm-eval's plain-text context: description, ``k`` answered shots, then the query.

    ``description=None`` uses the template's (nq_open's ``Answer these questions:\\n\\n``)."""
    desc = template.description if description is None else description
    body = "".join(
        render(template, roles) + template.target_delimiter + answer + template.fewshot_delimiter
        for roles, answer in shots
    )
    return desc + body + render(template, query)
