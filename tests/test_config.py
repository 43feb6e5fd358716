from pathlib import Path

import pytest

from distillqa.config import LoraConfig, SFTConfig, apply_overrides, load_config
from distillqa.errors import ConfigError
from distillqa.experiment.config import ExperimentConfig


def test_defaults_and_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\nmodel: gemma3-270m\n")
    cfg = load_config(SFTConfig, path, ["train.batch_size=2", "lora.target_modules=[q_proj, v_proj]", "train.max_grad_norm=null"])
    assert cfg.model.name == "gemma3-270m"
    assert cfg.train.lr == 0.001 and cfg.train.batch_size == 2 and cfg.train.max_grad_norm is None
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lrate: unknown key"):
        load_config(SFTConfig, None, ["train.lrate=1"])


def test_invalid_value_is_named():
    with pytest.raises(ConfigError, match=r"train\.lr: .*greater than 0"):
        load_config(SFTConfig, None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"data\.split_fractions: .*sum to 1"):
        load_config(ExperimentConfig, None, ["data.split_fractions=[0.5, 0.5, 0.5]"])


def test_bad_yaml_and_bad_override_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(SFTConfig, bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(SFTConfig, tmp_path / "missing.yaml")


def test_lora_paper_preset_and_explicit_fields_win():
    paper = LoraConfig.model_validate({"preset": "paper"})
    assert (paper.r, paper.alpha, paper.dropout) == (256, 8.0, 0.1)
    assert LoraConfig.model_validate({"preset": "paper", "r": 8}).r == 8


@pytest.mark.parametrize("command", ["sft", "distill", "generate", "evaluate", "experiment", "teacher-cache", "rationales",
                                     "rationales-generate"])
def test_described_config_round_trips_to_the_defaults(command, tmp_path):
    from distillqa.schemas import SCHEMAS, describe_config

    path = tmp_path / "c.yaml"
    path.write_text(describe_config(SCHEMAS[command]))
    assert load_config(SCHEMAS[command], path) == SCHEMAS[command]()
    assert "# Peak learning rate." in path.read_text() or command in ("generate", "evaluate", "teacher-cache", "rationales-generate")


def test_experiment_presets_fill_in_and_explicit_keys_win():
    quick = load_config(ExperimentConfig, None, ["distill.train.max_steps=3"])
    assert quick.preset == "quick" and quick.data.source == "bundled:telecom-sample"
    assert quick.distill.train.max_steps == 3 and quick.distill.train.batch_size == 4
    paper = load_config(ExperimentConfig, None, ["preset=paper", "evaluate.judge.url=http://x/v1", "evaluate.judge.model=j"])
    assert (paper.sft.lora.r, paper.distill.lora.alpha, paper.distill.train.epochs) == (256, 8.0, 10)
    assert (paper.distill.kd.kd_rate, paper.distill.kd.temperature, paper.prompt.max_length) == (0.5, 2.0, 512)


def test_experiment_config_errors_name_what_is_missing():
    with pytest.raises(ConfigError, match="preset 'cpu' needs data.source"):
        load_config(ExperimentConfig, None, ["preset=cpu"])
    with pytest.raises(ConfigError, match="judge metrics: set evaluate.judge.url"):
        load_config(ExperimentConfig, None, ["evaluate.metrics=default"])
    with pytest.raises(ConfigError, match=r"grid\.teachers\.0\.algorithms"):
        load_config(ExperimentConfig, None, ["grid.teachers=[{name: a, algorithms: [kd]}]"])


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    from distillqa.schemas import SCHEMAS

    schema = SCHEMAS[path.name.split("-")[0]]
    load_config(schema, path, ["data.source=somewhere.json"] if "data" in schema.model_fields else [])


def test_endpoint_keys_are_described_and_a_grid_names_no_single_model():
    from distillqa.config import GenerateConfig
    from distillqa.schemas import describe_config

    assert "#   concurrency: 8  # Requests in flight at once." in describe_config(GenerateConfig)
    for key in ("generation.endpoint", "distill.kd.teacher_endpoint"):
        with pytest.raises(ConfigError, match=f"{key}.model: the grid's rows and teachers are different models"):
            load_config(ExperimentConfig, None, [f"{key}.url=http://x/v1", f"{key}.model=m"])
