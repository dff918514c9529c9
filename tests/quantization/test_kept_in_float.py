"""Why a module stayed in float is a structured value (``KeptInFloat``), never a string parsed back."""

import json

from distill_lab.models import tiny_llama
from distill_lab.pipeline import group_size_skips
from distill_lab.quantization.api import KeptInFloat, Reason, quantize_
from distill_lab.quantization.configs import Int4WeightOnlyConfig
from distill_lab.quantization.qat import convert_, prepare_qat_


def test_reasons_are_structured_and_survive_the_step_record():
    summary = quantize_(tiny_llama(hidden_size=64, intermediate_size=96),
                        Int4WeightOnlyConfig(group_size=64, embedding_bits=None), filter_fn=lambda m, name: "q_proj" not in name)
    reasons = {name: why.reason for name, why in summary.float_modules.items()}
    assert {reasons[n] for n in reasons if "q_proj" in n} == {Reason.FILTER_FN}
    assert {reasons[n] for n in reasons if "down_proj" in n} == {Reason.GROUP_SIZE}  # 96 is not a multiple of 64
    assert reasons["model.embed_tokens"] is Reason.EMBEDDING_BITS and reasons["lm_head"] is Reason.EMBEDDING_BITS
    assert str(summary.float_modules["lm_head"]) == "output head follows embedding_bits=None"
    record = json.loads(json.dumps({"kept_in_float": {n: w.to_dict() for n, w in summary.float_modules.items()}}))
    assert {n: KeptInFloat.from_dict(v) for n, v in record["kept_in_float"].items()} == summary.float_modules
    skips = group_size_skips(record)
    assert set(skips) == {n for n in reasons if "down_proj" in n}
    assert all(detail == "in_features=96 not divisible by group_size=64" for detail in skips.values())


def test_a_detail_that_mentions_group_size_is_not_a_group_size_reason():
    fake = {"kept_in_float": {"a": KeptInFloat(Reason.FILTER_FN, "group_size mentioned in passing").to_dict(),
                              "b": KeptInFloat(Reason.GROUP_SIZE, "in_features=3 not divisible").to_dict()}}
    assert group_size_skips(fake) == {"b": "in_features=3 not divisible"}


def test_qat_convert_says_which_reason():
    model = tiny_llama(hidden_size=64, intermediate_size=96)
    prepare_qat_(model, Int4WeightOnlyConfig(group_size=64))
    summary = convert_(model)
    down = {why.reason for name, why in summary.float_modules.items() if "down_proj" in name}
    assert down == {Reason.GROUP_SIZE}


def test_awq_and_gptq_ask_the_format_which_layers_fit():
    from distill_lab.quantization.awq import awq_
    from distill_lab.quantization.gptq import gptq_

    from .helpers import calibration

    config = Int4WeightOnlyConfig(group_size=64, embedding_bits=None)
    chosen = awq_(tiny_llama(hidden_size=64, intermediate_size=96), config, calibration=calibration(), grid=3)
    kept = {name: why.reason for name, why in chosen.kept.items()}
    assert kept == {"model.layers.0.mlp.down": Reason.GROUP_SIZE, "model.layers.1.mlp.down": Reason.GROUP_SIZE}
    assert str(next(iter(chosen.kept.values()))) == "in_features=96 not divisible by group_size=64"
    summary = gptq_(tiny_llama(hidden_size=64, intermediate_size=96), config, calibration=calibration())
    assert {why.reason for n, why in summary.float_modules.items() if "down_proj" in n} == {Reason.GROUP_SIZE}
    assert not any("down_proj" in n for n in summary.changed)
