"""compressed-tensors export: our codes bit for bit in the library's layout, transformers reloads the folder with our
logits, pruned shapes kept, clear errors for what the format cannot hold, the CLI's --out rules."""

import json
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils.quantization_config import CompressedTensorsConfig  # noqa: E402

from distill_lab._hf import quiet_transformers  # noqa: E402
from distill_lab.export import float_copy  # noqa: E402
from distill_lab.export_ct import pack_int32, to_compressed_tensors  # noqa: E402
from distill_lab.models import tiny_llama  # noqa: E402
from distill_lab.quantization import (Int4WeightOnlyConfig, Int4WeightOnlyLinear, Int8DynamicConfig,  # noqa: E402
                                      Int8DynamicLinear, Int8WeightOnlyConfig, Int8WeightOnlyLinear, QuantizedModule,
                                      quantize_)

IDS = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
# the GGUF round trip's tolerances (tests/test_export.py): against our weights in fp32 arithmetic (float_copy),
# 1e-3 for int4 and 2e-3 for int8 absolute on the logits; against our own kernels, a mean difference under 5 %
ATOL = {"int8": 2e-3, "w8a8": 2e-3, "int4": 1e-3}
MEAN_REL = 0.05
SCHEMES = {"int8": Int8WeightOnlyConfig(), "w8a8": Int8DynamicConfig(),
           "int4": Int4WeightOnlyConfig(group_size=32, symmetric=True)}
FORMATS = {"int8": "pack-quantized", "w8a8": "int-quantized", "int4": "pack-quantized"}


def _tiny(**kw):
    return tiny_llama(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, **kw)


def _reload(folder, dequantize=False):
    """transformers' own load: compressed-tensors decompresses on the first forward (W8A8: and quantizes the inputs);
    ``dequantize=True`` makes it a float model at load time (weights only)."""
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the quantization_config from the model will be used"
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)


def _logits(model):
    with torch.inference_mode():
        return model(IDS).logits


def _check_codes(model, folder):
    """Every quantized Linear's tensors, read straight from model.safetensors, are our codes and scales."""
    tensors = load_file(str(folder / "model.safetensors"))
    for name, m in model.named_modules():
        if not isinstance(m, QuantizedModule) or name in ("model.embed_tokens", "lm_head"):
            continue  # the embedding and head go in as float values (test below)
        scale = tensors[f"{name}.weight_scale"]
        if isinstance(m, Int8DynamicLinear):  # int-quantized: the int8 codes as they are
            assert tensors[f"{name}.weight"].dtype == torch.int8
            assert torch.equal(tensors[f"{name}.weight"], m.weight_int8)
            assert scale.dtype == torch.float32 and torch.equal(scale, m.scales[:, None])
            continue
        shape = tensors[f"{name}.weight_shape"]
        assert shape.dtype == torch.int64 and shape.tolist() == [m.out_features, m.in_features]
        packed = tensors[f"{name}.weight_packed"]
        assert packed.dtype == torch.int32
        if isinstance(m, Int8WeightOnlyLinear):  # pack-quantized, 8 bits: 4 codes per int32
            assert packed.shape == (m.out_features, m.in_features // 4)
            assert torch.equal(unpack_from_int32(packed, 8, torch.Size(shape.tolist())), m.weight_int8)
            assert scale.dtype == torch.float32 and torch.equal(scale, m.scales[:, None])
        else:  # pack-quantized, 4 bits: the library's signed code + 8 is our kernel code
            assert isinstance(m, Int4WeightOnlyLinear)
            assert packed.shape == (m.out_features, m.in_features // 8)
            codes = unpack_from_int32(packed, 4, torch.Size(shape.tolist())).to(torch.int16) + 8
            assert torch.equal(codes.to(torch.uint8), m.codes())
            assert scale.dtype == torch.bfloat16 and torch.equal(scale, m.scales_and_zeros[..., 0].t())
        assert f"{name}.weight_zero_point" not in tensors and f"{name}.weight" not in tensors
    return tensors


# ----------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize("bits,k", [(4, 64), (4, 20), (8, 64), (8, 18)])
def test_pack_int32_is_the_librarys_packing(bits, k):
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    codes = torch.randint(lo, hi, (6, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and torch.equal(packed, pack_to_int32(codes, bits))
    assert torch.equal(unpack_from_int32(packed, bits, codes.shape), codes)
    with pytest.raises(ValueError, match="outside the signed 4-bit range"):
        pack_int32(torch.tensor([[8, 0]]), 4)
    with pytest.raises(ValueError, match="bits=3; allowed: 4 or 8"):
        pack_int32(codes, 3)


@pytest.mark.parametrize("kind", list(SCHEMES))
def test_round_trip_codes_config_and_logits(kind, tmp_path):
    """Export, read the tensors and config back, reload with transformers + compressed-tensors, compare logits."""
    model = _tiny()
    quantize_(model, SCHEMES[kind])
    report = to_compressed_tensors(model, None, tmp_path / kind)
    tensors = _check_codes(model, tmp_path / kind)
    assert "lm_head.weight" not in tensors  # tied: the head is the (float) embedding table
    assert torch.equal(tensors["model.embed_tokens.weight"], model.model.embed_tokens.dequantized_weight())
    qc = json.loads((tmp_path / kind / "config.json").read_text())["quantization_config"]
    assert qc == report.quantization_config and qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == FORMATS[kind] and qc["ignore"] == ["lm_head"] and len(report.quantized) == 2 * 7
    group = qc["config_groups"]["group_0"]
    assert QuantizationConfig.model_validate(qc).config_groups["group_0"].model_dump() == group  # the library's own
    preset = preset_name_to_scheme("W8A8" if kind == "w8a8" else "W4A16", ["Linear"]).model_dump()
    if kind == "w8a8":  # llm-compressor's W8A8 preset, argument for argument: dynamic per-token int8 inputs
        assert (group["weights"], group["input_activations"]) == (preset["weights"], preset["input_activations"])
    else:  # its W4A16 preset with our group size, or 8 bits per channel
        want = {"group_size": 32} if kind == "int4" else {"num_bits": 8, "group_size": None, "strategy": "channel"}
        assert group["weights"] == {**preset["weights"], **want} and group["input_activations"] is None
    exact, ours = _logits(float_copy(model)), _logits(model)
    theirs = _logits(_reload(tmp_path / kind))  # compressed-tensors decompresses (and quantizes W8A8 inputs)
    weights_only = _logits(_reload(tmp_path / kind, dequantize=True)) if kind == "w8a8" else theirs
    torch.testing.assert_close(weights_only, exact, rtol=0, atol=ATOL[kind])  # measured: 0.0
    assert (theirs - ours).abs().mean() < MEAN_REL * ours.abs().mean()
    if kind == "w8a8":  # the file says "our weights, inputs rounded per token at run time", and nothing else
        torch.testing.assert_close(theirs, _logits(_ct_token_rounding(float_copy(model), report.quantized)),
                                   rtol=0, atol=1e-4)  # measured: 0.0


def _ct_token_rounding(model, names):
    """``model`` with compressed-tensors' dynamic per-token int8 rounding on the inputs of ``names``.

    Its reference runtime (``calculate_qparams``) takes ``absmax / 127.5`` and clamps codes to [-128, 127];
    our W8A8 takes ``absmax / 127`` and [-127, 127]: the runtime's own rounding, not the file's.
    """
    def round_input(module, args):
        x = args[0]
        scale = x.abs().amax(-1, keepdim=True) / 127.5  # (B, T, 1)
        return (torch.clamp(torch.round(x / scale), -128, 127) * scale,)

    for name in names:
        model.get_submodule(name).register_forward_pre_hook(round_input)
    return model


def test_pruned_model_keeps_its_shapes(tmp_path):
    from distill_lab.pruning import StructuredConfig, prune_structured

    small = prune_structured(_tiny(num_layers=3), StructuredConfig(heads_keep=0.5, channels_keep=0.5)).eval()
    quantize_(small, Int4WeightOnlyConfig(group_size=32, symmetric=True))
    to_compressed_tensors(small, None, tmp_path / "ct")
    _check_codes(small, tmp_path / "ct")
    back = _reload(tmp_path / "ct")
    c = back.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == \
        (3, 2, 2, 16, 64)
    torch.testing.assert_close(_logits(back), _logits(float_copy(small)), rtol=0, atol=ATOL["int4"])


def test_int4_embedding_and_untied_head_go_in_as_their_float_values(tmp_path):
    model = _tiny()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() * 1.5)
    quantize_(model, Int4WeightOnlyConfig(group_size=32, symmetric=True, embedding_bits=4))
    report = to_compressed_tensors(model, None, tmp_path / "ct")
    assert [n.split(":")[0] for n in report.notes] == ["model.embed_tokens", "lm_head"]
    tensors = _check_codes(model, tmp_path / "ct")
    for name, m in (("model.embed_tokens", model.model.embed_tokens), ("lm_head", model.lm_head)):
        assert torch.equal(tensors[f"{name}.weight"], m.dequantized_weight())  # codes x scales, fp32
    back = _reload(tmp_path / "ct")
    assert back.config.tie_word_embeddings is False
    torch.testing.assert_close(_logits(back), _logits(float_copy(model)), rtol=0, atol=ATOL["int4"])


# ----------------------------------------------------------------------------------------------- errors
def _nonuniform():
    model = _tiny()
    mlp = model.model.layers[1].mlp  # a narrower MLP in one layer: no Llama config describes it
    mlp.gate_proj, mlp.up_proj = nn.Linear(64, 96, bias=False), nn.Linear(64, 96, bias=False)
    mlp.down_proj = nn.Linear(96, 64, bias=False)
    quantize_(model, Int8WeightOnlyConfig())
    return model


def _smooth():
    model = _tiny()
    quantize_(model, Int8DynamicConfig())
    model.model.layers[0].self_attn.q_proj.smooth = torch.full((64,), 2.0)
    return model


def _csr():
    from distill_lab.pruning import to_sparse_csr_

    model = _tiny()
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: "mlp" not in name)
    to_sparse_csr_(model, min_sparsity=0.0)
    return model


def _quantized(config):
    model = _tiny()
    quantize_(model, config)
    return model


@pytest.mark.parametrize("build,match", [
    (lambda: _quantized(Int4WeightOnlyConfig(group_size=32)),
     r"q_proj: asymmetric int4 .* allowed: Int4WeightOnlyConfig\(symmetric=True\)"),
    (_smooth, r"layers.0.self_attn.q_proj: W8A8 layer with an unfolded SmoothQuant factor"),
    (lambda: _quantized(Int8DynamicConfig(head="w8a8")),
     r"lm_head: a W8A8 output head .* Int8DynamicConfig\(head='weight_only'\)"),
    (_csr, r"layers.0.mlp.gate_proj: CSRLinear has no compressed-tensors mapping"),
    (_nonuniform, r"layers.1.mlp.down_proj.weight: the model holds shape \(64, 96\), its config rebuilds \(64, 128\)"),
    (_tiny, r"no quantized Linear layer"),
], ids=["asymmetric-int4", "smoothquant-factor", "w8a8-head", "csr", "per-layer-width", "float"])
def test_what_the_format_cannot_hold_is_refused(build, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        to_compressed_tensors(build(), None, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_out_folder_rules(tmp_path):
    model = _quantized(Int8WeightOnlyConfig())
    out = tmp_path / "ct"
    to_compressed_tensors(model, None, out)
    with pytest.raises(FileExistsError, match="earlier distill-lab export; pass --overwrite"):
        to_compressed_tensors(model, None, out)
    to_compressed_tensors(model, None, out, overwrite=True)
    (out / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.md"):
        to_compressed_tensors(model, None, out, overwrite=True)
    assert (out / "notes.md").read_text() == "mine"


# ----------------------------------------------------------------------------------------------- CLI
def _cli_err(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_cli_export_compressed_tensors(tmp_path, capsys):
    from distill_lab.__main__ import main
    from distill_lab.serialization import save_model

    saved = tmp_path / "int4"
    save_model(_quantized(Int4WeightOnlyConfig(group_size=32, symmetric=True)), None, saved)
    out = tmp_path / "ct"
    assert main(["export", str(saved), "--format", "compressed-tensors", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pack-quantized" in printed and f"vllm serve {out}" in printed
    model, _ = __import__("distill_lab").models.load_model(saved)
    torch.testing.assert_close(_logits(_reload(out)), _logits(float_copy(model)), rtol=0, atol=ATOL["int4"])
    capsys.readouterr()  # compressed-tensors' progress bars
    assert main(["export", str(saved), "--format", "compressed-tensors", "--out", str(out)]) == 2
    assert "pass --overwrite" in _cli_err(capsys)
    assert main(["export", str(saved), "--format", "compressed-tensors", "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["export", str(saved), "--format", "compressed-tensors", "--out", str(saved / "ct")]) == 2
    assert "lies inside the model being exported" in _cli_err(capsys)
    asym = tmp_path / "asym"
    save_model(_quantized(Int4WeightOnlyConfig(group_size=32)), None, asym)
    capsys.readouterr()
    assert main(["export", str(asym), "--format", "compressed-tensors", "--out", str(tmp_path / "ct2")]) == 2
    assert "asymmetric int4" in _cli_err(capsys) and not (tmp_path / "ct2").exists()
    assert main(["export", str(asym), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "allowed: gguf, compressed-tensors" in _cli_err(capsys)
