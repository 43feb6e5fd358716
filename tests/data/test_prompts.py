import pytest

from distillqa.data.prompts import IGNORE, PromptBuilder, collate_left, collate_right
from distillqa.data.records import QAExample
from distillqa.errors import ConfigError
from distillqa.models.registry import load_tokenizer

LONG = " ".join(f"Filler sentence number {i} about radio planning." for i in range(200))
EX = QAExample("x", "Which node anchors the user plane?", ("the UPF",), context=LONG + " The anchor is the UPF. " + LONG)


@pytest.fixture(params=["plain", "chat"])
def builder(request, tiny_model, tiny_chat_model):
    tok = load_tokenizer(tiny_model if request.param == "plain" else tiny_chat_model)
    return PromptBuilder(tok, "auto", "Answer briefly.", max_length=128)


def test_labels_cover_only_the_answer_and_eos(builder):
    short = QAExample("s", "Who?", ("the AMF",), context="The AMF does it.")
    enc = builder.encode_train(short)
    answer = [t for t in enc.labels if t != IGNORE]
    assert answer == builder.answer_ids("the AMF") and answer[-1] == builder.tok.eos_token_id
    assert enc.input_ids[-len(answer):] == answer
    assert builder.tok.decode(answer, skip_special_tokens=True).strip() == "the AMF"


def test_training_truncation_keeps_the_answer_and_respects_max_length(builder):
    enc = builder.encode_train(EX)
    assert len(enc.input_ids) <= 128
    assert "UPF" in builder.tok.decode(enc.input_ids[: enc.labels.index(next(t for t in enc.labels if t != IGNORE))])


def test_inference_truncation_keeps_the_start_and_room_to_answer(builder):
    ids = builder.encode_prompt(EX, max_new_tokens=32)
    assert len(ids) <= 128 - 32
    assert "Filler sentence number 0" in builder.tok.decode(ids)
    assert "Which node anchors" in builder.tok.decode(ids)


def test_example_that_cannot_fit_is_skipped(builder):
    huge_question = QAExample("h", "why " * 500, ("a",), context="c")
    assert builder.encode_train(huge_question) is None and builder.encode_prompt(huge_question, 8) is None


def test_template_choice(tiny_model, tiny_chat_model):
    assert PromptBuilder(load_tokenizer(tiny_chat_model), "auto").chat
    plain = PromptBuilder(load_tokenizer(tiny_model), "auto", "Answer.")
    assert not plain.chat and plain.prompt_text(EX, "ctx").endswith("Question: Which node anchors the user plane?\n\nAnswer:")
    with pytest.raises(ConfigError, match="no chat template"):
        PromptBuilder(load_tokenizer(tiny_model), "chat")


def test_collate_padding_sides():
    from distillqa.data.prompts import Encoded

    right = collate_right([Encoded("a", [5, 6, 7], [IGNORE, 6, 7]), Encoded("b", [5], [5])], pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]] and right["labels"][1].tolist() == [5, IGNORE, IGNORE]
    left = collate_left([[1, 2, 3], [4]], pad_id=0)
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]] and left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
