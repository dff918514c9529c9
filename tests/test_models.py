import time

import pytest
import torch

from distill_lab import models
from distill_lab.arch import parameter_count
from distill_lab.models import HubUnavailableError, check_vocab_compatible, load_model, make_student, tiny_llama


def test_parameter_count_splits_tied_embedding():
    m = tiny_llama(vocab_size=256, hidden_size=32)
    counts = {part: parameter_count(m, part) for part in ("total", "embedding", "non_embedding")}
    assert counts["embedding"] == 256 * 32  # tied head counted once
    assert counts["total"] == sum(p.numel() for p in m.parameters())
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]
    assert parameter_count(m.config) == counts["total"]  # a config counts the same, on a meta model
    with pytest.raises(ValueError, match="part='head'; allowed: total, embedding, non_embedding"):
        parameter_count(m, "head")


def test_parameter_count_counts_shared_storage_once():
    m = tiny_llama(vocab_size=256, hidden_size=32)
    m.lm_head.weight = torch.nn.Parameter(m.model.embed_tokens.weight.data)  # another Parameter, the same memory
    assert parameter_count(m, "embedding") == 256 * 32


def test_layer_drop_student_copies_every_kth_block():
    teacher = tiny_llama(num_layers=4)
    student = make_student(teacher, "layer_drop", keep_every=2)
    assert student.config.num_hidden_layers == 2
    for new_i, old_i in enumerate([0, 2]):
        for (k, a), b in zip(student.model.layers[new_i].state_dict().items(),
                             teacher.model.layers[old_i].state_dict().values()):
            assert torch.equal(a, b), k
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    check_vocab_compatible(teacher, student)


def test_random_student_is_smaller_and_validates():
    teacher = tiny_llama(num_layers=4, hidden_size=64, intermediate_size=128)
    student = make_student(teacher, "random", num_layers=2, hidden_size=32, intermediate_size=64)
    assert parameter_count(student, "non_embedding") < parameter_count(teacher, "non_embedding") / 2
    assert student(torch.randint(0, 256, (1, 8))).logits.shape == (1, 8, 256)
    with pytest.raises(ValueError, match="init='distil'"):
        make_student(teacher, "distil")
    with pytest.raises(ValueError, match="keep_every=0"):
        make_student(teacher, keep_every=0)
    with pytest.raises(ValueError, match="hidden_size=30 must divide"):
        make_student(teacher, "random", hidden_size=30)


def test_vocab_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match="teacher vocab_size=256, student vocab_size=128"):
        check_vocab_compatible(tiny_llama(vocab_size=256), tiny_llama(vocab_size=128))


def test_local_folder_roundtrip(tmp_path):
    m = tiny_llama()
    m.save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tk_models

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tk_models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")),
                            eos_token="a").save_pretrained(tmp_path)
    loaded, tok = load_model(tmp_path, device="cpu")
    x = torch.randint(0, 256, (1, 6))
    assert torch.equal(loaded(x).logits, m(x).logits)
    assert tok.pad_token is not None


def test_hub_id_offline_fails_fast_with_offline_hint(monkeypatch):
    monkeypatch.setattr(models.loading, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="load_teacher"):
        load_model("HuggingFaceTB/SmolLM2-135M")
    assert time.perf_counter() - start < 10


def test_missing_local_folder_is_clear():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./no/such/model/folder")


@pytest.mark.teacher
def test_real_teacher_converts_once_then_loads_fast(tmp_path, monkeypatch):
    """The GGUF -> safetensors path: first call converts, second reloads identical weights in < 5 s (checksum included)."""
    monkeypatch.setenv("DISTILL_LAB_CACHE", str(tmp_path))
    first, tok = models.load_teacher(device="cpu")
    assert (tmp_path / models.TEACHER_CACHE_NAME / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")], "temp folder left behind"
    start = time.perf_counter()
    second, _ = models.load_teacher(device="cpu")
    assert time.perf_counter() - start < 5  # includes one SHA-256 pass over the 513 MiB weights (~1.3 s idle)
    ids = tok("def add(a, b):\n    return a + b", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(first(ids).logits, second(ids).logits)
    assert parameter_count(second) == 134_515_008 and parameter_count(second, "embedding") == 49152 * 576
    assert second.config.num_key_value_heads == 3 and not hasattr(second.config, "quantization_config")
