"""Export a (compressed) Llama-family model to GGUF, the file format of llama.cpp, Ollama and LM Studio.

Formats: the GGUF specification and ggml's block quantizations (Gerganov et al., llama.cpp,
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md). The file is written with the
``gguf`` package's ``GGUFWriter``; quantized tensors are ggml blocks laid out as ``gguf.quants``
reads them.

How distill_lab's tensors map, without a second rounding where the formats coincide (each format
registers its mapping in ``quantization/formats.py``; the ggml blocks are built in ``quantization/ggml.py``):

* ``Int4WeightOnlyLinear`` (group 32/64/128/256, asymmetric or symmetric) -> **Q4_1**. Our kernel
  computes ``w = (q - 8)·scale + zero`` with bf16 ``scale`` and ``zero``; Q4_1 stores blocks of
  32 as ``w = d·q + m`` with fp16 ``d`` and ``m``. So one group of 64 is two Q4_1 blocks with
  ``d = scale`` and ``m = zero - 8·scale``, the same codes ``q``. A bf16 scale is exact in fp16
  (fewer mantissa bits) unless it lies below fp16's normal range (< 6.1e-5); ``m`` is exact
  when ``zero - 8·scale`` fits 11 significant bits, which holds for most groups. Groups that
  do not fit are rounded to the nearest fp16 once and counted in the ``ExportReport``.
  ``Int4Embedding`` (``embedding_bits=4``: asymmetric groups of 64) maps the same way, so
  ``token_embd`` is Q4_1 too and a tied int4 head is that tensor again.
* ``Int8WeightOnlyLinear`` / ``Int8DynamicLinear`` / ``Int8Embedding`` (int8 per channel / per
  row) -> **Q8_0** (blocks of 32 with an fp16 scale): the codes are kept, each row's fp32
  scale is rounded to fp16 (relative error <= 2^-11). A SmoothQuant factor is folded back into
  the weight, which is then re-quantized by ``gguf.quants`` (a second rounding, reported).
* float weights -> F32 (or F16 with ``float_type="f16"``); norms always F32.

llama.cpp permutes the rows of ``attn_q`` / ``attn_k`` (its rotary pairs dimensions
``(i, i + d/2)`` as adjacent rows); rows are whole quantization groups, so the permutation
moves blocks and never changes a value. A tied head is not written: llama.cpp reuses
``token_embd`` as the output matrix when ``output.weight`` is absent.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ._fs import DamagedFileError, atomic_file
from .models import open_gguf, teacher_gguf_path
from .quantization import formats  # noqa: F401  the built-in formats register their GGUF mappings
from .quantization.api import dequantize_
from .quantization.modules import QuantizedModule
from .quantization.registry import module_format
from .tensors import same_tensor

__all__ = ["check_exportable", "ExportReport", "float_copy", "FLOAT_TYPES", "read_gguf_tensor", "read_gguf_tensors",
           "SUPPORTED_FAMILIES", "to_gguf"]

SUPPORTED_FAMILIES = ("llama",)
FLOAT_TYPES = ("f32", "f16")


@dataclass
class ExportReport:
    """What ``to_gguf`` wrote: one ggml type per tensor and every value that needed a second rounding."""

    path: Path  # the GGUF file
    tensor_types: dict = field(default_factory=dict)  # GGUF tensor name -> ggml type name (Q4_1, Q8_0, F32, F16)
    rounded_groups: dict = field(default_factory=dict)  # tensor name -> Q4_1 groups whose m (or d) was rounded to fp16
    int4_groups: int = 0  # our int4 groups written as ggml blocks (Q4_1: each becomes group_size / 32 of them)
    notes: list = field(default_factory=list)  # one line per tensor that was re-quantized or dequantized
    tokenizer_source: str = ""  # "teacher GGUF" or "HF tokenizer"

    def counts(self) -> dict:
        """Number of tensors per ggml type."""
        out: dict = {}
        for t in self.tensor_types.values():
            out[t] = out.get(t, 0) + 1
        return out

    def summary(self) -> str:
        """One line: file, size, tensors per type, groups rounded."""
        kinds = ", ".join(f"{v} {k} tensors" for k, v in sorted(self.counts().items()))
        rounded = sum(self.rounded_groups.values())
        share = f" ({100 * rounded / self.int4_groups:.0f} %)" if self.int4_groups else ""
        size = self.path.stat().st_size / 2**20 if self.path.exists() else float("nan")
        return (f"{self.path.name}: {size:.1f} MiB, {kinds}; {rounded:,} of {self.int4_groups:,} int4 groups{share} "
                f"had their Q4_1 offset rounded to fp16; tokenizer from {self.tokenizer_source}")


# ----------------------------------------------------------------------------- rows
def _permute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, rows (i, i + d/2) become adjacent (2i, 2i + 1)."""
    rows = a.shape[0]
    return a.reshape(n_head, 2, rows // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


# ----------------------------------------------------------------------------- model checks
def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(f"rope type {kind!r} has no mapping in distill_lab.export; allowed: the default "
                             "(unscaled) rotary embedding")
        theta = theta if theta is not None else params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def check_exportable(model: nn.Module) -> None:
    """Raise a one-line ``ValueError`` unless ``model`` is a family that llama.cpp's ``llama`` architecture runs."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"model family {family!r} has no llama.cpp mapping in distill_lab.export; "
                         f"supported: {', '.join(SUPPORTED_FAMILIES)}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("Llama with attention_bias or mlp_bias has no mapping in distill_lab.export")
    _rope_theta(config)
    widths = {i: (layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features,
                  layer.mlp.gate_proj.out_features) for i, layer in enumerate(model.model.layers)}
    if len(set(widths.values())) > 1:
        first = widths[0]
        odd = next(i for i, w in widths.items() if w != first)
        raise ValueError(f"block {odd} has (q, k, MLP) widths {widths[odd]}, block 0 {first}; allowed: every "
                         "block the same width (llama.cpp's llama architecture reads one head count and one "
                         "MLP width for all blocks)")


# ----------------------------------------------------------------------------- tokenizer
def _copy_teacher_tokenizer(writer, reader) -> None:
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub)


def _same_vocab(tokenizer, reader) -> bool:
    if tokenizer is None:
        return True
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != len(tokenizer):
        return False
    vocab = tokenizer.get_vocab()
    probe = list(range(0, len(tokens.data), max(1, len(tokens.data) // 64)))
    return all(vocab.get(tokens.contents(i)) == i for i in probe)


def _add_hf_tokenizer(writer, tokenizer) -> None:
    """Write a byte-level BPE (GPT-2 style) HF fast tokenizer as ``tokenizer.ggml.*`` metadata."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError("only byte-level BPE tokenizers (GPT-2 style) can be written to GGUF by "
                         "distill_lab.export; this tokenizer is " + str(model.get("type")))
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(tokenizer.all_special_ids)
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


# ----------------------------------------------------------------------------- tensors
def _float_tensor(w: torch.Tensor, float_type: str) -> tuple[np.ndarray, str]:
    w = w.detach().float().cpu().numpy()
    return (w.astype(np.float16), "F16") if float_type == "f16" else (w, "F32")


def _module_tensor(module: nn.Module, float_type: str, n_head: int | None, report: ExportReport,
                   name: str):
    """(array, ggml type name, raw quant type or None) for one weight-holding module.

    A quantized module is written the way its registered kind says (``ModuleFormat.to_ggml``, see
    ``quantization/formats.py``); where its layout has no ggml block type, as its float weight.
    """
    if isinstance(module, QuantizedModule):
        to_ggml = module_format(module.kind).to_ggml
        if to_ggml is None:
            raise ValueError(f"{name}: {module.kind} modules are not exportable to GGUF (their format registers no "
                             "GGUF mapping); allowed: int8, w8a8 and int4 models, or a float one")
        blocks = to_ggml(module)
        if blocks is not None:
            report.int4_groups += blocks.groups
            if blocks.rounded:
                report.rounded_groups[name] = blocks.rounded
            if blocks.note:
                report.notes.append(f"{name}: {blocks.note}")
            data = _permute_rows(blocks.data, n_head) if n_head else blocks.data  # rows of blocks stay rows
            return data, blocks.ggml_type, gguf.GGMLQuantizationType[blocks.ggml_type]
        w = module.dequantized_weight()  # a layout ggml has no block type for: write its float weight
        report.notes.append(f"{name}: {module.kind} ({module.extra_repr()}) has no ggml block type; "
                            f"written as {float_type.upper()}")
    elif isinstance(module, (nn.Linear, nn.Embedding)):
        if getattr(module, "bias", None) is not None:
            raise ValueError(f"{name} has a bias: distill_lab.export writes bias-free Llama layers only")
        w = module.weight
    else:
        raise ValueError(f"{name}: module {type(module).__name__} has no GGUF mapping")
    arr, kind = _float_tensor(w, float_type)
    if n_head:
        arr = _permute_rows(arr, n_head)
    return arr, kind, None


def _file_type(report: ExportReport):
    counts = report.counts()
    if counts.get("Q4_1"):
        return gguf.LlamaFileType.MOSTLY_Q4_1
    if counts.get("Q8_0"):
        return gguf.LlamaFileType.MOSTLY_Q8_0
    return gguf.LlamaFileType.MOSTLY_F16 if counts.get("F16") else gguf.LlamaFileType.ALL_F32


def _teacher_gguf(path: Path):
    """The teacher's parsed GGUF, whose tokenizer every export copies: parsed once per file version
    (its 49k-token vocabulary takes ~4 s to parse; ``measure_speeds`` exports six models in a row)."""
    stat = path.stat()
    return _parsed_gguf(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _parsed_gguf(path: str, mtime_ns: int, size: int):
    return open_gguf(path)


def to_gguf(model: nn.Module, tokenizer, path: str | Path, float_type: str = "f32",
            name: str | None = None) -> ExportReport:
    """Write ``model`` (float or quantized by ``quantize_``, pruned or not) as a llama.cpp GGUF file; atomic."""
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type={float_type!r}; allowed: {', '.join(map(repr, FLOAT_TYPES))}")
    check_exportable(model)
    cfg = model.config
    base = model.model
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    path = Path(path).expanduser().resolve()
    report = ExportReport(path=path)

    try:
        teacher = _teacher_gguf(teacher_gguf_path())
    except (FileNotFoundError, ImportError):
        teacher = None
    use_teacher_vocab = teacher is not None and cfg.vocab_size == len(teacher.fields["tokenizer.ggml.tokens"].data) \
        and _same_vocab(tokenizer, teacher)
    if not use_teacher_vocab and tokenizer is None:
        raise ValueError("a tokenizer is needed: this model's vocabulary is not the teacher's")

    with atomic_file(path, suffix=".gguf", mode=0o644) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(name or getattr(cfg, "_name_or_path", "") or "distill_lab model")
        writer.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(_rope_theta(cfg))
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        writer.add_vocab_size(cfg.vocab_size)
        if use_teacher_vocab:
            _copy_teacher_tokenizer(writer, teacher)
            report.tokenizer_source = "teacher GGUF"
        else:
            _add_hf_tokenizer(writer, tokenizer)
            report.tokenizer_source = "HF tokenizer"

        tensors = []  # (gguf name, array, raw type)

        def put(gname, module, heads=None):
            arr, kind, raw = _module_tensor(module, float_type, heads, report, gname)
            tensors.append((gname, arr, raw))
            report.tensor_types[gname] = kind

        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        put("token_embd.weight", emb)
        tied = getattr(cfg, "tie_word_embeddings", False) and _shares_codes(emb, head)
        for i, layer in enumerate(base.layers):
            a, f = layer.self_attn, layer.mlp
            tensors.append((f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight.detach().float().numpy(), None))
            put(f"blk.{i}.attn_q.weight", a.q_proj, n_head)
            put(f"blk.{i}.attn_k.weight", a.k_proj, n_kv)
            put(f"blk.{i}.attn_v.weight", a.v_proj)
            put(f"blk.{i}.attn_output.weight", a.o_proj)
            tensors.append((f"blk.{i}.ffn_norm.weight",
                            layer.post_attention_layernorm.weight.detach().float().numpy(), None))
            put(f"blk.{i}.ffn_gate.weight", f.gate_proj)
            put(f"blk.{i}.ffn_up.weight", f.up_proj)
            put(f"blk.{i}.ffn_down.weight", f.down_proj)
        tensors.append(("output_norm.weight", base.norm.weight.detach().float().numpy(), None))
        if not tied:
            put("output.weight", head)
        for gname, arr, _ in tensors:
            report.tensor_types.setdefault(gname, "F32")
        writer.add_file_type(_file_type(report))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for gname, arr, raw in tensors:
            writer.add_tensor(gname, np.ascontiguousarray(arr), raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return report


def _shares_codes(emb: nn.Module, head: nn.Module | None) -> bool:
    """True when the head computes with the very same tensor as the embedding (a tied head)."""
    if head is None:
        return True
    return same_tensor(_codes_tensor(emb), _codes_tensor(head))


def _codes_tensor(module: nn.Module) -> torch.Tensor | None:
    """The tensor a module's weight lives in: int8 codes, packed int4 codes or the float weight."""
    for attr in ("weight_int8", "packed", "weight"):
        t = getattr(module, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    return None


# ----------------------------------------------------------------------------- reading back
def read_gguf_tensors(path: str | Path, raw: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a GGUF file (parsed once): dequantized to float32 (rows, cols), or raw blocks with ``raw=True``."""
    return {t.name: _tensor_data(path, t, raw) for t in open_gguf(path).tensors}


def read_gguf_tensor(path: str | Path, name: str, raw: bool = False) -> np.ndarray:
    """One tensor of a GGUF file: dequantized to float32 in (rows, cols) order, or its raw blocks with ``raw=True``."""
    for t in open_gguf(path).tensors:
        if t.name == name:
            return _tensor_data(path, t, raw)
    raise KeyError(f"{name!r} is not in {path}")


def _tensor_data(path, t, raw: bool) -> np.ndarray:
    try:
        data = np.array(t.data)
        return data if raw else gguf.quants.dequantize(data, t.tensor_type).astype(np.float32)
    except Exception as err:  # a crafted tensor table: sizes or types its data does not have  # noqa: BLE001
        raise DamagedFileError(f"GGUF file {str(path)!r}: tensor {t.name!r} cannot be read "
                               f"({type(err).__name__}: {' '.join(str(err).split())[:120]})") from None


def float_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of a quantized model that computes with exactly its (dequantized) weights, in fp32."""
    out = copy.deepcopy(model).float()
    dequantize_(out)
    return out.eval()
