"""A lean batch-1 decode loop for Llama models (float or quantized): static KV cache, fused projections.

Idea as in gpt-fast (PyTorch team, 2023, "Accelerating Generative AI with PyTorch II: GPT, Fast")
and llama.cpp: at batch 1 a decode step should cost its weight reads, yet Hugging Face's
``forward`` spends much of a 135M model's step outside the matmuls (a growing ``DynamicCache``
that concatenates, mask and rotary construction, output dataclasses, one call per projection).
``StaticDecoder`` keeps the model's own modules and numerics and removes that overhead:

* a preallocated K/V cache per layer, written in place (no ``torch.cat`` per token);
* the rotary table computed once by the model's own ``rotary_emb`` and indexed;
* q/k/v fused into one matmul and gate/up into one (int4: codes and scales concatenated,
  the same per-row kernel, so the same numbers; float: one concatenated weight);
* the head applied to the last position only;
* optionally ``torch.compile`` of the per-token step, falling back to eager where no compiler works.

Greedy tokens equal ``model.generate(do_sample=False)`` (tested).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .quantization.modules import Int4WeightOnlyLinear
from .timing import timed


def _fuse(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing ``cat([m(x) for m in mods], -1)``, or None when the kinds cannot be fused."""
    if all(type(m) is nn.Linear and m.bias is None for m in mods):
        w = torch.cat([m.weight.detach() for m in mods], 0)
        fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        fused.weight.data = w
        return fused
    if all(isinstance(m, Int4WeightOnlyLinear) and m.bias is None for m in mods):
        first = mods[0]
        if any(m.group_size != first.group_size or m.layout != first.layout or m.symmetric != first.symmetric
               for m in mods):
            return None
        codes = torch.cat([m.codes() for m in mods], 0)  # (sum N, K)
        sz = torch.cat([m.scales_and_zeros for m in mods], 1)  # (K/g, sum N, 2)
        return Int4WeightOnlyLinear(codes, sz, first.group_size, None, first.bits, first.symmetric, first.layout)
    return None


class StaticDecoder:
    """Greedy batch-1 decoding of a ``LlamaForCausalLM`` with a static cache; ``generate(ids, n)`` like HF's."""

    def __init__(self, model: nn.Module, max_len: int = 1024, fuse: bool = True, compile: bool = False):
        cfg = model.config
        if getattr(cfg, "model_type", None) != "llama":
            raise ValueError(f"StaticDecoder supports Llama models; got {getattr(cfg, 'model_type', None)!r}")
        self.model, self.max_len = model, max_len
        self.H, self.G = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        base = model.model
        p = next(iter(base.norm.parameters()))
        device, dtype = p.device, p.dtype
        self.layers = []
        for layer in base.layers:
            a, f = layer.self_attn, layer.mlp
            qkv = _fuse([a.q_proj, a.k_proj, a.v_proj]) if fuse else None
            gate_up = _fuse([f.gate_proj, f.up_proj]) if fuse else None
            self.layers.append((layer, qkv, gate_up))
        L = len(self.layers)
        self.k = torch.zeros(L, 1, self.G, max_len, self.d, device=device, dtype=dtype)  # (L, 1, G, S, d)
        self.v = torch.zeros_like(self.k)
        with torch.inference_mode():
            pos = torch.arange(max_len, device=device)[None]  # (1, S)
            cos, sin = base.rotary_emb(torch.zeros(1, device=device, dtype=dtype), pos)  # (1, S, d) each
        self.cos, self.sin = cos[0].clone(), sin[0].clone()  # (S, d)
        self.compile_s = 0.0
        self._step = self._forward
        if compile:
            self._step = self._compiled()

    def _compiled(self):
        """``torch.compile`` of the one-token step, or the eager step when compiling fails (timed once)."""
        try:
            fn = torch.compile(self._forward, dynamic=True)
            start = time.perf_counter()
            with torch.inference_mode():
                token = torch.zeros(1, 1, dtype=torch.long, device=self.k.device)
                for p in (0, 1):
                    fn(token, p)
            self.compile_s = time.perf_counter() - start
            return fn
        except Exception as err:  # no C++ compiler, unsupported op...: stay eager
            self.compile_error = f"{type(err).__name__}: {err}".splitlines()[0]
            return self._forward

    def _attention(self, i: int, layer, qkv, x: torch.Tensor, pos: int) -> torch.Tensor:
        a, T, H, G, d = layer.self_attn, x.shape[1], self.H, self.G, self.d
        if qkv is not None:
            q, k, v = qkv(x).split([H * d, G * d, G * d], -1)
        else:
            q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
        q = q.view(1, T, H, d).transpose(1, 2)  # (1, H, T, d)
        k = k.view(1, T, G, d).transpose(1, 2)  # (1, G, T, d)
        v = v.view(1, T, G, d).transpose(1, 2)
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]  # (T, d)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.k[i, :, :, pos:pos + T] = k
        self.v[i, :, :, pos:pos + T] = v
        keys, values = self.k[i, :, :, :pos + T], self.v[i, :, :, :pos + T]  # (1, G, pos+T, d)
        mask = None
        if T > 1:  # prefill: causal over the new tokens, full over the cached ones
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=G != H)  # (1, H, T, d)
        return a.o_proj(out.transpose(1, 2).reshape(1, T, H * d))

    def _mlp(self, layer, gate_up, x: torch.Tensor) -> torch.Tensor:
        f = layer.mlp
        if gate_up is not None:
            g, u = gate_up(x).chunk(2, -1)
        else:
            g, u = f.gate_proj(x), f.up_proj(x)
        return f.down_proj(F.silu(g) * u)

    def _forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """(1, T) ids at positions pos..pos+T-1 -> (1, V) logits of the last position; fills the cache."""
        base = self.model.model
        h = base.embed_tokens(ids)  # (1, T, D)
        for i, (layer, qkv, gate_up) in enumerate(self.layers):
            h = h + self._attention(i, layer, qkv, layer.input_layernorm(h), pos)
            h = h + self._mlp(layer, gate_up, layer.post_attention_layernorm(h))
        return self.model.lm_head(base.norm(h[:, -1:]))[:, 0]  # (1, V)

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation of (1, P) ``ids``: returns (1, P + new) like ``model.generate(do_sample=False)``."""
        if ids.shape[0] != 1:
            raise ValueError(f"batch size {ids.shape[0]}; StaticDecoder decodes one sequence (batch 1)")
        if ids.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(f"prompt + max_new_tokens = {ids.shape[1] + max_new_tokens} > max_len={self.max_len}")
        out = [ids]
        logits = self._forward(ids, 0)  # prefill (eager: its shape differs from the decode step)
        pos = ids.shape[1]
        for _ in range(max_new_tokens):
            token = logits.argmax(-1, keepdim=True)  # (1, 1)
            out.append(token)
            if eos_token_id is not None and int(token) == eos_token_id:
                break
            if len(out) - 1 == max_new_tokens:
                break
            logits = self._step(token, pos)
            pos += 1
        return torch.cat(out, 1)

    @torch.inference_mode()
    def decode_s(self, ids: torch.Tensor, tokens: int) -> float:
        """Seconds for ``tokens`` greedy decode steps after prefilling ``ids`` (the decode part of ``generate``)."""
        logits = self._forward(ids, 0)
        pos = ids.shape[1]
        state = {"logits": logits, "pos": pos}

        def steps():
            for _ in range(tokens):
                state["logits"] = self._step(state["logits"].argmax(-1, keepdim=True), state["pos"])
                state["pos"] += 1

        return timed(steps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)
