"""Tests for distill_lab.quantization.configs: validation, (de)serialization, and files saved under the old names."""

import importlib
import json
import warnings

import pytest

from distill_lab.quantization.configs import (Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig,
                                              SmoothQuantConfig, config_from_dict, config_to_dict)
from distill_lab.quantization.primitives import Granularity
from distill_lab.quantization.registry import config_types

from .helpers import SAMPLE_CONFIGS


def test_config_round_trip():
    for c in SAMPLE_CONFIGS:
        assert config_from_dict(config_to_dict(c)) == c
    with pytest.raises(ValueError, match="unknown"):
        config_from_dict({"type": "Int2Magic"})


def test_config_value_errors_name_the_bad_value_and_the_allowed_range():
    with pytest.raises(ValueError, match="group_size"):
        Int4WeightOnlyConfig(group_size=7)
    with pytest.raises(ValueError, match="bits"):
        Int4WeightOnlyConfig(bits=5)
    with pytest.raises(ValueError, match="act_granularity"):
        Int8DynamicConfig(act_granularity="per_row")
    with pytest.raises(ValueError, match="embedding_bits"):
        Int8WeightOnlyConfig(embedding_bits=5)
    with pytest.raises(ValueError, match=r"Int4WeightOnlyConfig.group_size=7; allowed: an even int >= 2"):
        Int4WeightOnlyConfig(group_size=7)
    with pytest.raises(ValueError, match=r"Int4WeightOnlyConfig.bits=5; allowed: 2, 3 or 4"):
        Int4WeightOnlyConfig(bits=5)
    with pytest.raises(ValueError, match=r"Int4WeightOnlyConfig.symmetric='yes'; allowed: True or False"):
        Int4WeightOnlyConfig(symmetric="yes")
    with pytest.raises(ValueError, match=r"Int8DynamicConfig.act_granularity='per_row'; allowed: 'per_token', "
                                         r"'per_tensor'"):
        Int8DynamicConfig(act_granularity="per_row")
    with pytest.raises(ValueError, match=r"Int8DynamicConfig.weight_granularity='per_group'; allowed: "
                                         r"'per_channel', 'per_tensor'"):
        Int8DynamicConfig(weight_granularity="per_group")
    with pytest.raises(ValueError, match=r"Int8DynamicConfig.head='fp8'; allowed: 'weight_only', 'w8a8'"):
        Int8DynamicConfig(head="fp8")
    with pytest.raises(ValueError, match=r"Int8WeightOnlyConfig.embedding_bits=5; allowed: None .*, 8 or 4"):
        Int8WeightOnlyConfig(embedding_bits=5)
    for alpha in (1.5, -0.1, "0.5", True):
        with pytest.raises(ValueError, match=r"SmoothQuantConfig.alpha=.*; allowed: a number in \[0, 1\]"):
            SmoothQuantConfig(alpha=alpha)


def test_granularity_fields_take_the_enum_and_its_strings_and_save_as_strings():
    c = Int8DynamicConfig(act_granularity="per_tensor", weight_granularity=Granularity.PER_TENSOR)
    assert c.act_granularity is Granularity.PER_TENSOR and c.weight_granularity == "per_tensor"
    assert Int8DynamicConfig(weight_granularity="per-channel").weight_granularity is Granularity.PER_CHANNEL
    assert repr(Int8DynamicConfig()) == ("Int8DynamicConfig(embedding_bits=8, act_granularity='per_token', "
                                         "weight_granularity='per_channel', head='weight_only')")
    as_dict = config_to_dict(c)
    assert all(type(v) is not Granularity for v in as_dict.values())  # plain data for JSON and YAML
    saved = json.loads(json.dumps(as_dict))
    assert saved == as_dict == {"type": "Int8DynamicConfig", "act_granularity": "per_tensor", "weight_granularity": "per_tensor",
                     "embedding_bits": 8, "head": "weight_only"}
    assert config_from_dict(saved) == c


def test_one_config_suffix_everywhere():
    importlib.import_module("distill_lab.quantization.formats")  # the built-in formats register themselves
    assert {c.__name__ for c in config_types()} >= {"Int8WeightOnlyConfig", "Int8DynamicConfig", "Int4WeightOnlyConfig"}
    assert all(c.__name__.endswith("Config") for c in config_types())
    assert config_to_dict(Int4WeightOnlyConfig())["type"] == "Int4WeightOnlyConfig"
    assert config_from_dict(config_to_dict(SmoothQuantConfig(0.3))) == SmoothQuantConfig(alpha=0.3)


@pytest.mark.parametrize("module", ["distill_lab.quantization", "distill_lab.quantization.configs"])
@pytest.mark.parametrize("old", ["Int8WeightOnly", "Int8Dynamic", "Int4WeightOnly"])
def test_the_old_config_names_are_gone_from_the_api(module, old):
    with pytest.raises(AttributeError, match=old):
        getattr(importlib.import_module(module), old)


@pytest.mark.parametrize("old, new", [("Int8WeightOnly", Int8WeightOnlyConfig()),
                                      ("Int8Dynamic", Int8DynamicConfig(act_granularity="per_tensor")),
                                      ("Int4WeightOnly", Int4WeightOnlyConfig(group_size=32, bits=3))])
def test_config_from_dict_reads_files_saved_under_the_old_names(old, new):
    saved = {**config_to_dict(new), "type": old}  # what quantization_config.json held before the rename
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading an old file is not the caller's deprecated use
        assert config_from_dict(saved) == new


def test_embedding_bits_is_one_keyword_only_field_of_quantization_config():
    from distill_lab.quantization.configs import QuantizationConfig

    for cls in (Int8WeightOnlyConfig, Int8DynamicConfig, Int4WeightOnlyConfig):
        assert issubclass(cls, QuantizationConfig) and "embedding_bits" not in cls.__annotations__
    assert Int4WeightOnlyConfig(32).group_size == 32  # the format's own fields keep their positions
    with pytest.raises(TypeError):
        Int8WeightOnlyConfig(4)
    with pytest.raises(ValueError, match=r"Int4WeightOnlyConfig\.embedding_bits=5; allowed: None .*, 8 or 4"):
        Int4WeightOnlyConfig(embedding_bits=5)
