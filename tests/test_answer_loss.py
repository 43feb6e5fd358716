"""The causal-LM answer loss (SFTObjective: answer positions only, projected to the vocabulary)
equals the model's own loss, `model(labels=...).loss`, on the same answer-only labels, for both
bundled model families, also through the LoRA wrapper that training uses."""

import pytest
import torch

from distillqa.config import LoraConfig
from distillqa.data import load_examples
from distillqa.data.prompts import IGNORE, PromptBuilder, collate_right
from distillqa.models.lora import apply_lora
from distillqa.models.registry import load_model, load_tokenizer
from distillqa.train.objectives import SFTObjective

pytestmark = pytest.mark.real_models


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_answer_loss_equals_the_models_own_loss(name):
    tok, model = load_tokenizer(name), load_model(name, precision="fp32")
    builder = PromptBuilder(tok, max_length=256)
    examples = load_examples("bundled:telecom-sample")[0][:3]
    encoded = [builder.encode_train(ex) for ex in examples]
    for ex, enc in zip(examples, encoded):  # the labels are the answer (and EOS) only, at the end
        answer = builder.answer_ids(ex.answers[0])
        assert enc.labels[-len(answer):] == answer and set(enc.labels[:-len(answer)]) == {IGNORE}
    batch = collate_right(encoded, tok.pad_token_id)  # right padding: rows of different lengths
    assert len({len(e.input_ids) for e in encoded}) > 1
    model.eval()
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        ours, logs = SFTObjective()(model, batch)
        torch.testing.assert_close(ours, own, rtol=1e-4, atol=1e-5)
        wrapped = apply_lora(model, LoraConfig(r=4, dropout=0.0))  # LoRA B starts at zero: the same function
        wrapped.eval()
        torch.testing.assert_close(SFTObjective()(wrapped, batch)[0], own, rtol=1e-4, atol=1e-5)
    assert 0.5 < own.item() < 20 and logs["ce"] == pytest.approx(own.item(), rel=1e-4)
