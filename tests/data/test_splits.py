import pytest

from conftest import SHARED
from distillqa.data import load_examples, split_examples
from distillqa.data.records import QAExample


def make(n_contexts=40, per=3):
    return [QAExample(f"{c}-{q}", f"q{q}", ("a",), context=f"context {c}") for c in range(n_contexts) for q in range(per)]


def test_split_is_deterministic_grouped_and_near_fractions():
    exs = make()
    a, b = split_examples(exs, (0.7, 0.1, 0.2), seed=3), split_examples(list(reversed(exs)), (0.7, 0.1, 0.2), seed=3)
    assert {k: [e.id for e in v] for k, v in a.items()} == {k: [e.id for e in v] for k, v in b.items()}
    contexts = {k: {e.context for e in v} for k, v in a.items()}
    assert not (contexts["train"] & contexts["test"]) and not (contexts["train"] & contexts["validation"])
    assert sum(len(v) for v in a.values()) == len(exs)
    assert abs(len(a["test"]) - 24) <= 3 and abs(len(a["train"]) - 84) <= 3
    assert [e.id for e in split_examples(exs, (0.7, 0.1, 0.2), seed=4)["test"]] != [e.id for e in a["test"]]


@pytest.mark.skipif(not (SHARED / "telequad").is_dir(), reason="needs ../shared/data")
def test_no_telequad_test_context_is_seen_in_training():
    exs, _ = load_examples(str(SHARED / "telequad" / "TeleQuAD-v4-full.json"))
    s = split_examples(exs, (0.8, 0.1, 0.1), seed=0)
    assert not ({e.context for e in s["train"]} & {e.context for e in s["test"]})
    assert 0.08 < len(s["test"]) / len(exs) < 0.12
