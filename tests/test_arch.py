"""Tests for distill_lab.arch: the parameter count a config implies, for every adapted family."""

import pytest
import torch

from distill_lab import arch
from distill_lab.support import tiny_config
from distill_lab.tensors import unique_tensors


def _model_and_count(config):
    """The model a config builds and its parameter count, each piece of memory once."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return model, sum(p.numel() for p in unique_tensors(model.parameters()))


@pytest.mark.parametrize("family", list(arch.FAMILIES))
@pytest.mark.parametrize("variant", ["as built", "biases", "tied flipped"])
def test_parameter_count_equals_the_models_unique_parameters(family, variant):
    """Biases where the family has them, norms, and a tied head counted once: the config count is the model's."""
    config = tiny_config(family)
    if variant == "biases":  # the bias switches this family's config has (Qwen2 has q/k/v biases anyway)
        for name in ("attention_bias", "mlp_bias"):
            if hasattr(config, name):
                setattr(config, name, True)
    elif variant == "tied flipped":
        config.tie_word_embeddings = not config.tie_word_embeddings
    model, real = _model_and_count(config)
    assert arch.parameter_count(config) == real, family
    has_bias = any(n.endswith(".bias") for n, _ in model.named_parameters())
    if variant == "biases" and (family == "qwen2" or hasattr(config, "attention_bias")):
        assert has_bias, family  # the count above included them
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == bool(config.tie_word_embeddings), family
