import pytest
import torch

from distillqa.errors import ModelError
from distillqa.models.derive import parse_layer_spec
from distillqa.models.registry import derive_student, load_model, resolve_model_path


def test_layer_specs():
    assert parse_layer_spec("every-other", 30) == list(range(0, 30, 2))
    assert parse_layer_spec("0-2,5", 6) == [0, 1, 2, 5]
    for bad in ("3,1", "0-9", "x", "1,1"):
        with pytest.raises(ModelError, match="layer spec"):
            parse_layer_spec(bad, 6)


def test_pruned_student_keeps_the_chosen_layers_and_generates(tiny_model, tmp_path):
    teacher = load_model(tiny_model)
    out = derive_student(tiny_model, "every-other", tmp_path / "student")
    student = load_model(str(out))
    assert student.config.num_hidden_layers == 2
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    ids = torch.tensor([[1, 5, 9, 11]])
    cached = student.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = student.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)  # the KV cache is indexed by the renumbered layers


def test_layer_syntax_is_cached(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLQA_CACHE", str(tmp_path))
    path = resolve_model_path(f"{tiny_model}@layers=0,3")
    assert load_model(path).config.num_hidden_layers == 2 and path.startswith(str(tmp_path))


def test_unknown_model_names_are_clear(tmp_path):
    with pytest.raises(ModelError, match="no such model directory"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="holds no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match="could not load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")
