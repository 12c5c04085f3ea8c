"""Config loading, overrides and validation: every mistake stops early with the key named."""
import json

import pytest
import yaml

from mmrl_megatron.config import ConfigError, ModelShape, load_config, model_shape, save_resolved, validate_layout
from mmrl_megatron.models.errors import ModelError
from mmrl_megatron.models.hf_config import read_hf_config

SHAPE = ModelShape(num_layers=4, num_attention_heads=4, num_key_value_heads=2)


def test_yaml_then_overrides_take_precedence(tmp_path):
    """Invariant: schema defaults < YAML < command-line overrides; types follow the schema."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"steps": 7}, "rollout": {"n": 3, "temperature": 0.7}}))
    config = load_config(str(path), ["rollout.n=5", "data.train_files=[a.parquet,b.parquet]"])
    assert config.trainer.steps == 7
    assert config.rollout.n == 5 and config.rollout.temperature == 0.7
    assert config.data.train_files == ["a.parquet", "b.parquet"]
    assert config.actor.optim.lr == 1e-6  # untouched default


@pytest.mark.parametrize("override, named, suggested", [
    ("rollout.tempreature=0.5", "rollout.tempreature", "rollout.temperature"),
    ("trainer.stepz=3", "trainer.stepz", "trainer.steps"),
    ("paralel.tensor=2", "paralel", "parallel"),
])
def test_misspelled_key_is_named_with_a_suggestion(override, named, suggested):
    """Invariant: an unknown key fails at load time, naming the key and the closest valid one."""
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert f"'{named}'" in str(error.value) and f"'{suggested}'" in str(error.value)


def test_misspelled_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("actor:\n  optim:\n    learning_rate: 1e-5\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert "actor.optim.learning_rate" in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize("override, fragment", [
    ("trainer.steps=many", "trainer.steps"),
    ("trainer.device=tpu", "trainer.device"),
    ("override_without_equals", "key=value"),
])
def test_wrong_type_or_choice_is_named(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, world_size, fragment", [
    (["parallel.tensor=2", "parallel.pipeline=2", "parallel.data=2"], 4, "parallel.data=2"),
    (["parallel.tensor=3"], 3, "parallel.tensor=3 does not divide the model's 4 attention heads"),
    (["parallel.pipeline=3"], 3, "parallel.pipeline=3 does not divide the model's 4 layers"),
    (["parallel.tensor=2"], 3, "does not divide the world size 3"),
    (["data.prompts_per_step=3"], 2, "data.prompts_per_step=3"),
])
def test_impossible_layout_fails_naming_the_factors(overrides, world_size, fragment):
    """Invariant: a layout that cannot run is refused before any model is built, naming the keys."""
    config = load_config(None, overrides)
    with pytest.raises(ConfigError) as error:
        validate_layout(config, world_size, SHAPE)
    assert fragment in str(error.value)


def test_data_parallel_size_is_derived():
    config = load_config(None, ["parallel.tensor=2", "data.prompts_per_step=4"])
    assert validate_layout(config, 8, SHAPE) == 4


def test_model_shape_from_flat_and_nested_config(tmp_path):
    """Invariant: published (flat, transformers 4.x) and nested (5.x) config.json give the same shape."""
    flat, nested = tmp_path / "flat", tmp_path / "nested"
    flat.mkdir()
    nested.mkdir()
    dims = {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4}
    (flat / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", **dims}))
    (nested / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "text_config": dims}))
    assert model_shape(read_hf_config(str(flat))) == model_shape(read_hf_config(str(nested))) == ModelShape(28, 28, 4)
    with pytest.raises(ModelError, match="model.hf_path"):
        read_hf_config(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        model_shape({"model_type": "qwen2_5_vl"})


def test_resolved_config_round_trips(tmp_path):
    """Invariant: the config written into the run directory reproduces the run's config."""
    config = load_config(None, ["rollout.n=3", "algorithm.dual_clip=3.0"])
    path = save_resolved(config, str(tmp_path / "run"))
    assert load_config(path) == config


def test_parallel_dims_from_config_fill_derived_sizes():
    from mmrl_megatron.parallel import ParallelDims, ParallelLayout

    config = load_config(None, ["parallel.tensor=2", "parallel.pipeline=2", "data.prompts_per_step=2"])
    dims = ParallelDims.from_config(config, 8, SHAPE)
    assert dims.layout == ParallelLayout(tensor=2, pipeline=2, expert_tensor=2, data=2)
