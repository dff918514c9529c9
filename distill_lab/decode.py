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
* at one token per step (decode), a flat step that calls the kernels directly: the int4 kernel on
  bf16 input (its bf16 output is promoted by the next fp32 op instead of converted), rotary on q
  and k at once with a precomputed signed sine, no module calls or reshapes per projection. A
  decode step of a 135M model was over a thousand small ops, each costing microseconds of dispatch,
  so once the weights are int4 the op count decides the step time (measured: docs/deploy.md);
* optionally ``torch.compile`` of the per-token step, falling back to eager where no compiler works
  (on the 2-core Xeon it compiled in 10 s and decoded slower than the flat eager step: docs/deploy.md).

Greedy tokens equal ``model.generate(do_sample=False)``, and the flat step's logits equal the
general step's bit for bit (tested).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .quantization.dispatch import kernel_path
from .quantization.modules import Int4WeightOnlyLinear
from .timing import stopwatch, timed

__all__ = ["StaticDecoder", "lean_decode_supported"]


def lean_decode_supported(model: nn.Module) -> str | None:
    """None when ``StaticDecoder`` serves ``model``, else why not (one line)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != "llama":
        return f"StaticDecoder supports Llama models; got {model_type!r}"
    return None


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
    """Greedy batch-1 decoding of a ``LlamaForCausalLM`` with a static cache; ``generate(ids, n)`` like HF's.

    Build it after the model's last change: it holds fused copies of q/k/v and gate/up and the
    other weights by reference, as they were at construction.
    """

    def __init__(self, model: nn.Module, max_len: int = 1024, fuse: bool = True, compile: bool = False):
        reason = lean_decode_supported(model)
        if reason is not None:
            raise ValueError(reason)
        cfg = model.config
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
        kv = torch.zeros(L, 1, 2 * self.G, max_len, self.d, device=device, dtype=dtype)  # (L, 1, 2G, S, d)
        self.k, self.v = kv[:, :, :self.G], kv[:, :, self.G:]  # (L, 1, G, S, d) views: one write per token
        self._kv = kv
        with torch.inference_mode():
            pos = torch.arange(max_len, device=device)[None]  # (1, S)
            cos, sin = base.rotary_emb(torch.zeros(1, device=device, dtype=dtype), pos)  # (1, S, d) each
        self.cos, self.sin = cos[0].clone(), sin[0].clone()  # (S, d)
        self._flat = self._flat_layers(dtype) if fuse else None
        self.compile_s = 0.0
        self._step = self._forward
        if compile:
            self._step = self._compiled()

    def _flat_layers(self, dtype: torch.dtype) -> list[tuple] | None:
        """Per layer: the tensors and projection calls of the flat decode step, or None when it does not apply.

        It applies to float32 models (the residual stream the general step keeps) whose q/k/v and
        gate/up were fused, with an even head size; anything else decodes through the general step.
        """
        if dtype != torch.float32 or self.d % 2:
            return None
        # rotary tables for all H + 2G rows of the fused q/k/v output: v rows get cos 1, sin 0, which
        # leaves them exactly as they are; rotate_half(x) * sin == roll(x, d/2) * [-sin_1, sin_2]
        H, G, half = self.H, self.G, self.d // 2
        sin_signed = torch.cat([-self.sin[:, :half], self.sin[:, half:]], -1)[:, None]  # (S, 1, d)
        cos = self.cos[:, None].expand(-1, H + 2 * G, -1).clone()  # (S, H+2G, d)
        sin = sin_signed.expand(-1, H + 2 * G, -1).clone()
        cos[:, H + G:], sin[:, H + G:] = 1.0, 0.0
        self._rotary = cos, sin
        flat = []
        for i, (layer, qkv, gate_up) in enumerate(self.layers):
            if qkv is None or gate_up is None:
                return None
            a, f = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if any(type(n).__name__ != "LlamaRMSNorm" for n in norms):
                return None
            flat.append((norms[0].weight, norms[0].variance_epsilon, _projection(qkv), _projection(a.o_proj),
                         norms[1].weight, norms[1].variance_epsilon, _projection(gate_up),
                         _projection(f.down_proj), self._kv[i, 0]))
        return flat

    def _compiled(self):
        """``torch.compile`` of the one-token step, or the eager step when compiling fails (timed once)."""
        try:
            fn = torch.compile(self._forward, dynamic=True)
            elapsed = stopwatch()
            with torch.inference_mode():
                token = torch.zeros(1, 1, dtype=torch.long, device=self.k.device)
                for p in (0, 1):
                    fn(token, p)
            self.compile_s = elapsed()
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
        if ids.shape[1] == 1 and self._flat is not None:
            return self._flat_step(ids, pos)
        return self._general(ids, pos)

    def _flat_step(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """One token (1, 1) at ``pos`` -> (1, V) logits: the general step's numbers in a few dozen ops per layer."""
        H, G, d = self.H, self.G, self.d
        base = self.model.model
        h = base.embed_tokens(ids)[0]  # (1, D) float32
        cos, sin = self._rotary[0][pos], self._rotary[1][pos]  # (H+2G, d)
        for w1, eps1, qkv, o_proj, w2, eps2, gate_up, down, kv in self._flat:
            x = qkv(_rms_norm(h, w1, eps1, qkv.in_dtype)).view(H + 2 * G, d)  # (H+2G, d): q, k, v rows
            x = x * cos + x.roll(d // 2, -1) * sin  # rotary of q and k at once (v unchanged), float32
            kv[:, pos] = x[H:]  # (2G, d) into the (2G, S, d) cache
            out = F.scaled_dot_product_attention(x[:H].view(1, H, 1, d), kv[None, :G, :pos + 1],
                                                 kv[None, G:, :pos + 1], enable_gqa=G != H)  # (1, H, 1, d)
            h = h + o_proj(out.view(1, H * d).to(o_proj.in_dtype))  # a bf16 output is promoted exactly
            g, u = gate_up(_rms_norm(h, w2, eps2, gate_up.in_dtype)).float().chunk(2, -1)  # (1, I) each
            h = h + down(F.silu(g).mul_(u).to(down.in_dtype))
        return self.model.lm_head(base.norm(h))  # (1, V)

    def _general(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """Any number of tokens through the model's own modules (prefill; decode where the flat step does not apply)."""
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
            token = _greedy(logits)  # (1, 1)
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
                state["logits"] = self._step(_greedy(state["logits"]), state["pos"])
                state["pos"] += 1

        return timed(steps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """(1, V) -> (1, 1) index of the first maximum, as ``argmax`` (``max`` measured 2x faster on the CPU)."""
    return logits.max(-1, keepdim=True).indices


class _Projection:
    """A projection as one kernel call: int4 on bf16 input (bf16 out), ``F.linear`` for float weights, else the module.

    ``in_dtype`` is what the call wants its input in; the output may be bf16, which the flat step's
    next float32 op promotes exactly as the module's own ``.to(float32)`` would.
    """

    __slots__ = ("call", "in_dtype")

    def __init__(self, call, in_dtype: torch.dtype):
        self.call, self.in_dtype = call, in_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(x)


def _projection(mod: nn.Module) -> _Projection:
    aten = torch.ops.aten
    if (isinstance(mod, Int4WeightOnlyLinear) and mod.bias is None and mod.layout in ("cpu", "cuda")
            and kernel_path("int4", 1, mod.packed.device) == "kernel"):  # else the module's measured path
        kernel = aten._weight_int4pack_mm_for_cpu if mod.layout == "cpu" else aten._weight_int4pack_mm
        packed, group, sz = mod.packed, mod.group_size, mod.scales_and_zeros
        return _Projection(lambda x: kernel(x, packed, group, sz), torch.bfloat16)
    if type(mod) is nn.Linear and mod.bias is None:
        weight = mod.weight
        return _Projection(lambda x: F.linear(x, weight), weight.dtype)
    return _Projection(mod, torch.float32)


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """``LlamaRMSNorm`` of float32 ``h`` in the same ops (same numbers), cast to the next kernel's ``dtype``."""
    variance = h.pow(2).mean(-1, keepdim=True)
    return (weight * (h * torch.rsqrt(variance + eps))).to(dtype)
