"""How good a language model is: perplexity (three units), generations, repeated n-grams, next-token logits.

Perplexity is ``exp(mean token negative log-likelihood)`` over the scored tokens (Jelinek et
al., 1977). Numbers from different harnesses disagree because they choose a different window
(context length), stride (how much context each scored token sees), and unit (per token of
*this* tokenizer vs per word or byte); see notebook 00.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..runtime import autocast as _autocast
from ..runtime import device_of as _device_of

__all__ = ["generate_continuations", "generate_samples", "next_token_logits", "perplexity", "perplexity_units",
           "repeated_ngram_share", "token_nll"]


@torch.inference_mode()
def token_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, bf16: bool = False,
              context: int = 0, progress: bool = True) -> tuple[float, int]:
    """Return the summed next-token negative log-likelihood and the number of scored tokens."""
    if windows.dim() != 2:
        raise ValueError(f"windows must be 2-D (N, T), got shape {tuple(windows.shape)}")
    T = windows.shape[1]
    if not 0 <= context < T - 1:
        raise ValueError(f"context={context}; allowed: 0 <= context < window - 1 ({T - 1})")
    device = _device_of(model)
    total, count = 0.0, 0
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="perplexity", leave=False, disable=not progress):
        batch = batch.to(device)  # (B, T)
        with _autocast(device, bf16):
            logits = model(batch).logits  # (B, T, V)
        # token t+1 is predicted from position t; the first `context` targets are conditioning only
        logits = logits[:, context:-1].float()  # (B, T-1-context, V)
        targets = batch[:, context + 1:]  # (B, T-1-context)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              reduction="sum")
        total += nll.item()
        count += targets.numel()
    return total, count


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, bf16: bool = False,
               context: int = 0, progress: bool = True) -> float:
    """Token-level perplexity over (N, T) windows; with overlapping windows set ``context = T - stride``."""
    total, count = token_nll(model, windows, batch_size, bf16, context, progress)
    return math.exp(total / count)


def perplexity_units(model: nn.Module, tokenizer, windows: torch.Tensor, batch_size: int = 8,
                     bf16: bool = False, context: int = 0, progress: bool = True) -> dict[str, float]:
    """The same likelihood in three units: per-token perplexity, per-word perplexity and bits per byte."""
    total, count = token_nll(model, windows, batch_size, bf16, context, progress)
    scored = [tokenizer.decode(w[context + 1:].tolist()) for w in windows]  # the scored text
    words = sum(len(text.split()) for text in scored)
    nbytes = sum(len(text.encode("utf-8")) for text in scored)
    return {"token_ppl": math.exp(total / count), "word_ppl": math.exp(total / words),
            "bits_per_byte": total / (math.log(2) * nbytes), "tokens": count, "words": words,
            "bytes": nbytes}


@torch.inference_mode()
def generate_continuations(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 40,
                           temperature: float = 0.0, seed: int = 0, chat: bool = False) -> list[dict]:
    """Continue each prompt (greedy when ``temperature == 0``): ``[{"text", "ids"}]``, new tokens only.

    ``ids`` are the generated token ids (fewer than ``max_new_tokens`` when the model stopped at EOS),
    the input of :func:`repeated_ngram_share`.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature}; allowed: >= 0 (0 means greedy)")
    device = _device_of(model)
    outputs = []
    for prompt in prompts:
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        torch.manual_seed(seed)
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) \
            if temperature > 0 else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
        new = out[0, ids.shape[1]:].tolist()
        outputs.append({"text": tokenizer.decode(new, skip_special_tokens=True), "ids": new})
    return outputs


def generate_samples(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 40,
                     temperature: float = 0.0, seed: int = 0, chat: bool = False) -> list[str]:
    """Generate a continuation for each prompt (greedy when ``temperature == 0``); returns new text only."""
    return [g["text"] for g in generate_continuations(model, tokenizer, prompts, max_new_tokens,
                                                      temperature, seed, chat)]


def repeated_ngram_share(ids, n: int = 4) -> float:
    """Share of the ``n``-grams of a generated token sequence that already occurred earlier in it.

    0 for text that never repeats a run of ``n`` tokens; near 1 for a loop ("the value of the value
    of ..."). A sequence shorter than ``n + 1`` tokens has nothing to repeat and scores 0, so report
    the number of tokens next to it (a model that stops at once is not fluent either).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}; allowed: an int >= 1")
    ids = [int(i) for i in ids]
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


@torch.inference_mode()
def next_token_logits(model: nn.Module, tokenizer, prompt: str) -> torch.Tensor:
    """Return the model's logits for the token that follows ``prompt``, shape (V,)."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    return model(ids.to(_device_of(model))).logits[0, -1].float().cpu()  # (V,)
