"""Build students: a layer-dropped or random smaller model of the teacher's family, and a tiny test Llama.

Layer-dropped students follow DistilBERT (Sanh et al., 2019, arXiv:1910.01108): copy every k-th
block of the teacher. ``check_vocab_compatible`` is what distillation asks of a teacher-student pair.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ..arch import adapter
from ..runtime import device_of

__all__ = ["check_vocab_compatible", "make_student", "tiny_llama"]


def check_vocab_compatible(teacher: nn.Module, student: nn.Module, tokenizer=None) -> int:
    """Raise ``ValueError`` unless teacher and student logits cover the same vocabulary; return its size."""
    t_vocab = teacher.config.vocab_size
    s_vocab = student.config.vocab_size
    if t_vocab != s_vocab:
        raise ValueError(f"vocabulary mismatch: teacher vocab_size={t_vocab}, student "
                         f"vocab_size={s_vocab}; distillation needs identical vocabularies")
    if tokenizer is not None and len(tokenizer) > t_vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the models' vocab_size is "
                         f"{t_vocab}; allowed: len(tokenizer) <= {t_vocab}")
    return t_vocab


def make_student(teacher: nn.Module, init: str = "layer_drop", *, keep_every: int = 2,
                 layers: list[int] | None = None, num_layers: int | None = None,
                 hidden_size: int | None = None, intermediate_size: int | None = None,
                 num_attention_heads: int | None = None, num_key_value_heads: int | None = None,
                 seed: int = 0) -> nn.Module:
    """Build a smaller model of the teacher's family and vocabulary (``layer_drop`` or ``random`` init).

    The student keeps the teacher's class and config (sliding window, norms, ``layer_types`` of
    the kept blocks); families without an architecture adapter are refused with a ``ValueError``.
    """

    ad = adapter(teacher, "make_student")
    cfg = teacher.config
    n_teacher = cfg.num_hidden_layers
    if init == "layer_drop":
        if layers is None:
            if not isinstance(keep_every, int) or not 1 <= keep_every <= n_teacher:
                raise ValueError(f"keep_every={keep_every!r}; allowed: an int in [1, {n_teacher}]")
            layers = list(range(0, n_teacher, keep_every))
        layers = list(layers)
        if not layers or any(not 0 <= i < n_teacher for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"layers={layers!r}; allowed: distinct block indices in [0, {n_teacher - 1}]")
        if any(v is not None for v in (hidden_size, intermediate_size, num_attention_heads,
                                       num_key_value_heads)):
            raise ValueError("init='layer_drop' keeps the teacher's widths; use init='random' "
                             "(or distill_lab.pruning) to change them")
        torch.manual_seed(seed)
        student = ad.shrink(layers).train()
    elif init == "random":
        overrides = {"num_hidden_layers": num_layers, "hidden_size": hidden_size,
                     "intermediate_size": intermediate_size,
                     "num_attention_heads": num_attention_heads,
                     "num_key_value_heads": num_key_value_heads}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        for k, v in overrides.items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}={v!r}; allowed: a positive int")
        merged = {**cfg.to_dict(), **overrides}
        heads, kv = merged["num_attention_heads"], merged["num_key_value_heads"]
        if merged["hidden_size"] % heads or heads % kv:
            raise ValueError(f"hidden_size={merged['hidden_size']} must divide by "
                             f"num_attention_heads={heads}, which must divide by num_key_value_heads={kv}")
        merged["head_dim"] = merged["hidden_size"] // heads
        if merged.get("layer_types") is not None:  # rebuilt by the config class for the new depth
            merged["layer_types"] = None
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(type(cfg)(**merged))
    else:
        raise ValueError(f"init={init!r}; allowed: 'layer_drop', 'random'")
    return student.to(device_of(teacher))


def tiny_llama(vocab_size: int = 256, hidden_size: int = 32, num_layers: int = 2,
               intermediate_size: int = 64, num_heads: int = 4, num_kv_heads: int = 2,
               seed: int = 0) -> LlamaForCausalLM:
    """Build a tiny random Llama (for unit tests and quick exercises)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()
