"""The one record type for QA examples, whatever file they came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class QAExample:
    """One question with its reference answers.

    `context` is empty for closed-book tasks (CommonsenseQA); `choices` is empty unless the
    task is multiple choice; `source` records where the example came from (dataset, file,
    line or id) so that later errors and reports can point back to it.
    """

    id: str
    question: str
    answers: tuple[str, ...]
    context: str = ""
    choices: tuple[str, ...] = ()
    explanation: str | None = None
    source: dict = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["answers"], d["choices"] = list(self.answers), list(self.choices)
        return d
