"""GGUF export: Q4_1 / Q8_0 blocks bit-exact to our codes, transformers reloads the file with our logits, CLI errors."""

import numpy as np
import pytest
import torch

from distill_lab.export import float_copy, read_gguf_tensor, read_gguf_tensors, to_gguf
from distill_lab.models import load_gguf
from distill_lab.quantization import (Int4WeightOnlyConfig, Int4WeightOnlyLinear, Int8Embedding, Int8WeightOnlyConfig,
                                      quantize_)
from distill_lab.quantization.ggml import int4_q4_1_parts, q4_1_blocks, q8_0_blocks

gguf = pytest.importorskip("gguf")


def _permute(a, n_head):  # llama.cpp's q/k row order, written out independently of export._permute_rows
    out = np.empty_like(a)
    rows = a.shape[0] // n_head
    for h in range(n_head):
        block = a[h * rows:(h + 1) * rows]
        out[h * rows:(h + 1) * rows][0::2] = block[:rows // 2]
        out[h * rows:(h + 1) * rows][1::2] = block[rows // 2:]
    return out


def _parse_q4_1(raw):
    """(N, K/32·20) uint8 -> d (N, K/32), m (N, K/32) fp32 and codes (N, K) read byte by byte."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, -1)
    return d, m, codes


def test_q4_1_blocks_decode_to_d_q_plus_m():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (4, 128), dtype=np.uint8)
    d = rng.uniform(0.01, 0.1, (4, 2)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-1, 0, (4, 2)).astype(np.float16).astype(np.float32)
    blocks = q4_1_blocks(codes, d, m, group_size=64)
    assert blocks.shape == (4, 128 // 32 * 20)
    w = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)  # the package's reader
    expected = codes.astype(np.float32) * np.repeat(d, 64, axis=1) + np.repeat(m, 64, axis=1)
    np.testing.assert_array_equal(w, expected)
    with pytest.raises(ValueError, match="divisible by 32"):
        q4_1_blocks(codes[:, :48], d, m, group_size=16)


def test_q8_0_blocks_keep_codes_and_round_scales_to_fp16():
    rng = np.random.default_rng(1)
    codes = rng.integers(-127, 128, (3, 64), dtype=np.int8)
    scales = rng.uniform(1e-3, 1e-2, 3).astype(np.float32)
    w = gguf.quants.dequantize(q8_0_blocks(codes, scales), gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(w, codes * scales.astype(np.float16).astype(np.float32)[:, None])


def _pruned_tiny():
    from distill_lab.models import tiny_llama
    from distill_lab.pruning import StructuredConfig, prune_structured

    model = tiny_llama(vocab_size=49152, hidden_size=64, num_layers=3, intermediate_size=128, num_heads=4,
                       num_kv_heads=2)
    small = prune_structured(model, StructuredConfig(heads_keep=0.5, channels_keep=0.5))
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 2)
    assert small.config.head_dim == 16 and small.config.intermediate_size == 64
    return small.eval()


def _ids(n=24, seed=0):
    return torch.randint(0, 49152, (1, n), generator=torch.Generator().manual_seed(seed))


def _check_q4_1_exact(model, path, n_head, n_kv):
    """Every Q4_1 block holds our codes, d = our scale, m = our offset (to fp16); count groups rounded."""
    rounded = 0
    raw = read_gguf_tensors(path, raw=True)  # parsed once: the tokenizer metadata is 100k strings
    for i, layer in enumerate(model.model.layers):
        for gname, mod, heads in (("attn_q", layer.self_attn.q_proj, n_head), ("attn_k", layer.self_attn.k_proj, n_kv),
                                  ("attn_v", layer.self_attn.v_proj, None), ("ffn_down", layer.mlp.down_proj, None)):
            assert isinstance(mod, Int4WeightOnlyLinear)
            codes, s, m, inexact = int4_q4_1_parts(mod)
            rounded += inexact
            per = mod.group_size // 32
            s, m = np.repeat(s, per, axis=1), np.repeat(m, per, axis=1)
            if heads:
                codes, s, m = _permute(codes, heads), _permute(s, heads), _permute(m, heads)
            d_f, m_f, codes_f = _parse_q4_1(raw[f"blk.{i}.{gname}.weight"])
            np.testing.assert_array_equal(codes_f, codes)  # bit-exact codes
            np.testing.assert_array_equal(d_f, s)  # bf16 scales are exact in fp16
            np.testing.assert_array_equal(m_f, m.astype(np.float16).astype(np.float32))
            # the float weight read back from the file equals ours to fp16 precision of the offset
            w = gguf.quants.dequantize(raw[f"blk.{i}.{gname}.weight"], gguf.GGMLQuantizationType.Q4_1)
            ours = mod.dequantized_weight().numpy()
            ours = _permute(ours, heads) if heads else ours
            np.testing.assert_allclose(w, ours, rtol=0, atol=float(np.abs(m).max()) * 2.0 ** -11)
    return rounded


def test_pruned_tiny_llama_int4_round_trip(tmp_path):
    model = _pruned_tiny()
    quantize_(model, Int4WeightOnlyConfig(group_size=32))
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    path = tmp_path / "tiny.gguf"
    report = to_gguf(model, None, path)
    assert report.counts() == {"Q4_1": 3 * 7, "Q8_0": 1, "F32": 3 * 2 + 1}  # tied head: no output.weight
    assert report.tokenizer_source == "teacher GGUF"
    _check_q4_1_exact(model, path, model.config.num_attention_heads, model.config.num_key_value_heads)
    back, _ = load_gguf(path, tokenizer=False)
    c = back.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == \
        (3, 2, 2, 16, 64)
    ids = _ids()
    with torch.inference_mode():
        exact = float_copy(model)(ids).logits  # our weights, fp32 arithmetic
        ours = model(ids).logits  # our int4 kernel (bf16 activations)
        theirs = back(ids).logits
    # tolerance: same weights up to fp16 offsets -> 1e-3 absolute on logits of this size
    torch.testing.assert_close(theirs, exact, rtol=0, atol=1e-3)
    assert (theirs - ours).abs().mean() < 0.05 * ours.abs().mean()


def test_float_and_int8_tiny_export_matches(tmp_path):
    from distill_lab.models import tiny_llama

    model = tiny_llama(vocab_size=49152, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)
    ids = _ids()
    with torch.inference_mode():
        ref = model(ids).logits
    path = tmp_path / "f32.gguf"
    report = to_gguf(model, None, path)
    assert set(report.counts()) == {"F32"}
    back, _ = load_gguf(path, tokenizer=False)
    with torch.inference_mode():
        torch.testing.assert_close(back(ids).logits, ref, rtol=0, atol=1e-4)  # float: the same model

    quantize_(model, Int8WeightOnlyConfig())
    with torch.inference_mode():
        exact = float_copy(model)(ids).logits
    report = to_gguf(model, None, tmp_path / "int8.gguf")
    assert set(report.counts()) == {"Q8_0", "F32"} and report.counts()["Q8_0"] == 2 * 7 + 1
    raw = read_gguf_tensor(tmp_path / "int8.gguf", "blk.0.ffn_up.weight", raw=True)
    q = raw.reshape(raw.shape[0], -1, 34)[..., 2:].copy().view(np.int8).reshape(raw.shape[0], -1)
    np.testing.assert_array_equal(q, model.model.layers[0].mlp.up_proj.weight_int8.numpy())  # same codes
    back, _ = load_gguf(tmp_path / "int8.gguf", tokenizer=False)
    with torch.inference_mode():
        torch.testing.assert_close(back(ids).logits, exact, rtol=0, atol=2e-3)  # fp16 scales


def test_unsupported_family_and_bias_raise(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distill_lab.export import check_exportable

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="family 'qwen2' has no llama.cpp mapping"):
        to_gguf(qwen, None, tmp_path / "q.gguf")
    with pytest.raises(ValueError, match="float_type"):
        to_gguf(qwen, None, tmp_path / "q.gguf", float_type="bf16")
    from distill_lab.models import tiny_llama

    m = tiny_llama()
    m.config.attention_bias = True
    with pytest.raises(ValueError, match="attention_bias"):
        check_exportable(m)
    assert not (tmp_path / "q.gguf").exists()


def _cli_err(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_cli_export_help_and_errors(tmp_path, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from distill_lab.__main__ import main
    from distill_lab.models import TEACHER_CACHE_NAME, cache_dir, tiny_llama

    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    assert exc.value.code == 0 and "gguf" in capsys.readouterr().out
    assert main(["export", "teacher", "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "--format 'onnx'; allowed: gguf" in _cli_err(capsys)
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    teacher_folder = cache_dir() / TEACHER_CACHE_NAME
    if not teacher_folder.is_dir():
        pytest.skip("teacher cache not built")
    AutoTokenizer.from_pretrained(teacher_folder).save_pretrained(folder)
    capsys.readouterr()  # the setup's own progress bars
    assert main(["export", str(folder), "--out", str(tmp_path / "g.gguf")]) == 2
    assert "family 'gpt2' has no llama.cpp mapping" in _cli_err(capsys)
    llama = tmp_path / "llama"
    tiny_llama(vocab_size=49152, hidden_size=64, intermediate_size=128).save_pretrained(llama)
    AutoTokenizer.from_pretrained(teacher_folder).save_pretrained(llama)
    capsys.readouterr()
    assert main(["export", str(llama), "--out", str(tmp_path / "l.gguf")]) == 0
    assert "F32" in capsys.readouterr().out and (tmp_path / "l.gguf").stat().st_size > 0
    mine = tmp_path / "notes.gguf"  # a file the user already has is never replaced unasked
    mine.write_text("my notes")
    assert main(["export", str(llama), "--out", str(mine)]) == 2
    assert "exists; pass --overwrite" in _cli_err(capsys) and mine.read_text() == "my notes"
    assert main(["export", str(llama), "--out", str(tmp_path)]) == 2
    assert "is a folder" in _cli_err(capsys)
    assert main(["export", str(llama), "--out", str(mine), "--overwrite"]) == 0
    assert mine.read_bytes()[:4] == b"GGUF"


@pytest.mark.teacher
def test_teacher_int4_export_round_trip(teacher, tmp_path):
    import copy

    model, tokenizer = teacher
    model = copy.deepcopy(model)
    quantize_(model, Int4WeightOnlyConfig(group_size=64))
    path = tmp_path / "teacher-int4.gguf"
    report = to_gguf(model, tokenizer, path)
    assert report.counts() == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    groups = 210 * 0 + sum(m.scales_and_zeros.shape[0] * m.out_features for m in model.modules()
                           if isinstance(m, Int4WeightOnlyLinear))
    # bf16 zero = min + 8·scale, so m = zero - 8·scale can need more than fp16's 11 significant bits
    assert 0 < sum(report.rounded_groups.values()) < 0.25 * groups
    assert path.stat().st_size < 100 * 2**20
    rounded = _check_q4_1_exact(model, path, 9, 3)
    assert rounded > 0
    back, tok = load_gguf(path)
    assert tok.chat_template == tokenizer.chat_template
    ids = tokenizer("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.", return_tensors="pt").input_ids
    with torch.inference_mode():
        exact = float_copy(model)(ids).logits
        ours = model(ids).logits
        theirs = back(ids).logits
    # the same weights (offsets to fp16) in fp32: measured max 0.045 on logits up to ~35
    assert (theirs - exact).abs().max() < 0.15
    assert (theirs.argmax(-1) == exact.argmax(-1)).float().mean() == 1
    # against our int4 kernel, which computes in bf16: measured mean 0.064, max 0.54
    assert (theirs - ours).abs().mean() < 0.15 and (theirs - ours).abs().max() < 1.5


def test_blocks_of_different_widths_are_refused_not_written(tmp_path):
    """llama.cpp's llama architecture reads one MLP width for every block: a file written from the config's
    width would not load, so export says which block differs instead."""
    from torch import nn

    model = _pruned_tiny()
    mlp = model.model.layers[1].mlp
    keep = mlp.gate_proj.out_features // 2
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        setattr(mlp, name, nn.Linear(old.in_features, keep, bias=False))
    mlp.down_proj = nn.Linear(keep, mlp.down_proj.out_features, bias=False)
    with pytest.raises(ValueError, match=r"block 1 has \(q, k, MLP\) widths .*allowed: every block the same width"):
        to_gguf(model, None, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_load_gguf_names_a_damaged_file_and_restores_the_libraries_it_speeds_up(tmp_path):
    from distill_lab._fs import DamagedFileError

    model = _pruned_tiny()
    path = tmp_path / "tiny.gguf"
    to_gguf(model, None, path)
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    load_gguf(path, tokenizer=False)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)  # patched only while loading
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:4096])  # truncated inside the tokenizer's metadata
    with pytest.raises(DamagedFileError, match="cut.gguf.*damaged or not a GGUF file"):
        load_gguf(cut, tokenizer=False)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_gguf(tmp_path / "missing.gguf")
