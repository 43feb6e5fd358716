import json

import torch

from distillqa.config import GenerationConfig
from distillqa.data import load_examples
from distillqa.data.prompts import PromptBuilder
from distillqa.generate import generate_predictions
from distillqa.io import append_jsonl
from distillqa.models.registry import load_model, load_tokenizer


def setup(model_name):
    tok = load_tokenizer(model_name)
    return load_model(model_name), tok, PromptBuilder(tok, "auto", "Answer.", max_length=256)


def test_batched_generation_matches_one_by_one(tiny_model, tmp_path):
    model, tok, builder = setup(tiny_model)
    exs = load_examples("bundled:telecom-sample")[0][:5]
    cfg = GenerationConfig(max_new_tokens=6, batch_size=4)
    rows = [json.loads(x) for x in generate_predictions(model, tok, builder, exs, cfg, tmp_path / "b" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [e.id for e in exs]
    assert rows[0]["references"] == list(exs[0].answers) and exs[0].question in rows[0]["prompt"]
    for ex, row in zip(exs, rows):  # left padding must not change greedy answers
        ids = torch.tensor([builder.encode_prompt(ex, 6)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == row["prediction"]


def test_generation_resumes_without_redoing_answers(tiny_model, tmp_path):
    model, tok, builder = setup(tiny_model)
    exs = load_examples("bundled:telecom-sample")[0][:4]
    out = tmp_path / "predictions.jsonl"
    partial = tmp_path / "predictions.partial.jsonl"
    append_jsonl(partial, [{"id": exs[0].id, "prediction": "kept from before", "references": ["x"]}])
    with open(partial, "a") as f:
        f.write('{"id": "torn')  # a crash mid-line
    generate_predictions(model, tok, builder, exs, GenerationConfig(max_new_tokens=4), out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [e.id for e in exs] and rows[0]["prediction"] == "kept from before"
    assert not partial.exists()


def test_merged_run_is_a_standalone_model_equal_to_the_adapter_run(tiny_model, tmp_path):
    from distillqa.config import SFTConfig, load_config
    from distillqa.models.lora import merge_run
    from distillqa.train.sft import run_sft

    run = run_sft(load_config(SFTConfig, None, [f"model.name={tiny_model}", f"output_dir={tmp_path}/run", "train.max_steps=3",
                                                "train.lr=1e-2", "data.max_train_examples=8", "train.batch_size=4"]))
    merge_run(str(run), str(tmp_path / "merged"))
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    from peft import PeftModel

    ids = torch.tensor([[3, 8, 13, 21]])
    merged, base = load_model(str(tmp_path / "merged")), load_model(tiny_model)
    # The reference: the adapter applied at run time on top of the base weights (peft's unmerged
    # forward, W x + scale * B A x), not a second merge.
    unmerged = PeftModel.from_pretrained(load_model(tiny_model), str(run / "final" / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-3)


def test_generate_refuses_a_directory_made_with_another_config(tiny_model, tmp_path):
    import pytest

    from distillqa.config import GenerateConfig, load_config
    from distillqa.errors import RunDirError
    from distillqa.generate import run_generate

    args = [f"model.name={tiny_model}", f"output_dir={tmp_path}", "data.max_eval_examples=2", "generation.max_new_tokens=2"]
    first = run_generate(load_config(GenerateConfig, None, args)).read_text()
    assert run_generate(load_config(GenerateConfig, None, args)).read_text() == first  # same config: reused
    with pytest.raises(RunDirError, match="different config"):
        run_generate(load_config(GenerateConfig, None, args + ["generation.max_new_tokens=3"]))
