"""Which Hugging Face families each technique supports: tiny random models per family and the support table.

The table below is the contract that ``tests/test_families.py`` checks cell by cell, on tiny
random models built offline from configs: a supported cell must match a reference (quantized
logits within a band of a float fake-quant model, pruned logits equal to a zeroed-weights or
skipped-blocks reference, smoothing preserving the float function, reloads identical); a
refused cell must raise one ``ValueError`` naming the model class. The support table in
``docs/byom.md`` is generated from it (``python -m distill_lab.support --markdown``).
"""

from __future__ import annotations

import argparse

import torch
import transformers
from transformers import AutoModelForCausalLM

from .arch import FAMILIES as ADAPTED

__all__ = ["ENTRY_POINTS", "FAMILY_CONFIGS", "LINEAR_ONLY", "main", "support_markdown", "support_table",
           "supported", "tiny_config", "tiny_model"]

# entry point -> what the matrix checks for it
ENTRY_POINTS = {
    "quantize": "quantize_ (int8, W8A8, int4; embedding + head) and save/load",
    "wanda": "Wanda 50 % and 2:4, sequential (block by block)",
    "structured": "structured heads / channels / layers, save + from_pretrained",
    "make_student": "make_student (layer drop, same family and config)",
    "gptq": "gptq_ (int4)",
    "awq": "awq_ (int4)",
    "smoothquant": "smooth_ (SmoothQuant)",
    "qat": "prepare_qat_ / convert_",
    "params": "parameter counts (biases, norms, all experts)",
}
LINEAR_ONLY = ("quantize", "wanda", "gptq", "qat", "params")  # need nn.Linear weights, not an adapter

# family -> (transformers config class, extra config fields, HF model class)
_SHAPE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128)
_GQA = dict(_SHAPE, intermediate_size=96, num_key_value_heads=2)
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", dict(_GQA)),
    "mistral": ("MistralConfig", dict(_GQA, sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(_GQA)),
    "qwen3": ("Qwen3Config", dict(_GQA, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(_GQA, head_dim=16, sliding_window=8)),
    "gemma3": ("Gemma3TextConfig", dict(_GQA, num_hidden_layers=4, head_dim=16, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"] * 2)),
    "phi3": ("Phi3Config", dict(_GQA, pad_token_id=0)),
    "gpt2": ("GPT2Config", dict(vocab_size=256, n_embd=64, n_layer=3, n_head=4, n_positions=128)),
    "opt": ("OPTConfig", dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                              ffn_dim=96, word_embed_proj_dim=64, max_position_embeddings=128, pad_token_id=1)),
    "gpt_neox": ("GPTNeoXConfig", dict(_SHAPE, intermediate_size=96)),
    "mixtral": ("MixtralConfig", dict(_GQA, num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
}


def supported(family: str, entry: str) -> bool:
    """True when ``entry`` supports ``family`` (else it refuses with a ValueError)."""
    if entry == "params":
        return True
    if family in ("gpt2", "mixtral"):  # Conv1D / 3-D expert weights: every weight-level technique refuses
        return False
    return family in ADAPTED or entry in LINEAR_ONLY


def tiny_config(family: str):
    """The tiny config of ``family`` (hidden 64, 3-4 layers, GQA and a window of 8 where the family has them)."""
    cls_name, fields = FAMILY_CONFIGS[family]
    return getattr(transformers, cls_name)(**fields)


def tiny_model(family: str, seed: int = 0, vocab_size: int | None = None) -> torch.nn.Module:
    """A tiny random causal LM of ``family`` with random norm weights and biases (so folding errors show)."""
    config = tiny_config(family)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms (w or 1 + w) and biases: away from their neutral init
                p.normal_(0.0 if "bias" in name or family.startswith("gemma") else 1.0, 0.2)
    return model.eval()


def support_table() -> list[dict]:
    """One row per family: ``{"family": name, entry: True/False, ...}``."""
    return [{"family": f, **{e: supported(f, e) for e in ENTRY_POINTS}} for f in FAMILY_CONFIGS]


def support_markdown() -> str:
    """The support table as Markdown (``docs/byom.md``'s copy must equal it)."""
    head = "| family | " + " | ".join(ENTRY_POINTS) + " |"
    rule = "|---|" + "---|" * len(ENTRY_POINTS)
    rows = [f"| {r['family']} | " + " | ".join("yes" if r[e] else "refused" for e in ENTRY_POINTS) + " |"
            for r in support_table()]
    legend = "; ".join(f"**{k}**: {v}" for k, v in ENTRY_POINTS.items())
    return "\n".join([head, rule, *rows, "", legend]) + "\n"


def main(argv=None) -> int:
    """Print the support table (``--markdown``)."""
    parser = argparse.ArgumentParser(prog="python -m distill_lab.support", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (the default)")
    parser.parse_args(argv)
    print(support_markdown(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
