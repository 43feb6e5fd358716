"""Layer importance on a tiny model whose layer 2 is made an identity (its attention and MLP
outputs zeroed, so the residual stream passes through unchanged): both measures rank it last."""

import pytest
import torch

from distillqa.data.prompts import collate_right
from distillqa.errors import ModelError
from distillqa.models.derive import bundled_calibration, select_layers
from distillqa.models.importance import angular_distances, block_influence, layer_boundaries
from distillqa.models.registry import load_model, load_tokenizer


@pytest.fixture(scope="module")
def identity_at_2(tiny_model):
    model = load_model(tiny_model, "fp32")
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    return model, bundled_calibration(load_tokenizer(tiny_model), count=16)


def test_an_identity_layer_is_the_least_important(identity_at_2):
    model, batches = identity_at_2
    states, layers = layer_boundaries(model, batches)
    assert states.shape[:2] == (len(layers) + 1, sum(int(b["attention_mask"].sum()) for b in batches))
    influence = block_influence(states)
    assert influence[2] == pytest.approx(0.0, abs=1e-6) and min(influence[:2] + influence[3:]) > 1e-3
    distances = angular_distances(states, 1)
    assert min(range(len(distances)), key=distances.__getitem__) == 2
    for spec in ("angular:3", "block-influence:3"):
        keep, how = select_layers(model, spec, batches)
        assert keep == [0, 1, 3], (spec, how)


def test_angular_drops_the_most_similar_contiguous_block(identity_at_2):
    model, batches = identity_at_2
    keep, how = select_layers(model, "angular:2", batches)
    assert len(keep) == 2 and how["block"][1] - how["block"][0] == 1
    assert 2 in range(how["block"][0], how["block"][1] + 1)  # the block of two includes the identity
    assert select_layers(model, "angular:4", batches)[0] == [0, 1, 2, 3]


def test_measured_specs_need_text_and_a_sane_count(identity_at_2):
    model, batches = identity_at_2
    with pytest.raises(ModelError, match="calibration text"):
        select_layers(model, "angular:2", None)
    with pytest.raises(ModelError, match="between 1 and the model's 4 layers"):
        select_layers(model, "block-influence:9", batches)
