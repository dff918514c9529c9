"""Fixtures of the pruning tests: calibration batches and a tiny Llama with the teacher's GQA shape."""

import pytest
import torch


def make_calib(vocab=256, n=2, b=2, t=16, seed=0):
    """``n`` seeded (b, t) token batches."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, t), generator=g) for _ in range(n)]


def make_gqa_tiny(seed=0):
    """A tiny Llama with the teacher's GQA shape: 9 query heads in 3 KV groups, head_dim 8."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=72, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                      max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def calib():
    """``calib(vocab=256, n=2, b=2, t=16, seed=0)``: seeded calibration batches."""
    return make_calib


@pytest.fixture
def gqa_tiny():
    """``gqa_tiny(seed=0)``: a tiny Llama with 9 query heads in 3 KV groups."""
    return make_gqa_tiny
