"""Any model of the package as an lm-evaluation-harness model (``lm_eval.api.model.LM``), offline.

The harness (Gao et al., 2023) asks a model for log-likelihoods of (context, continuation) pairs; its
``HFLM`` would do that for a Hugging Face model, but it expects a loadable hub id or a ``PreTrainedModel``
and asks the hub for the model's revision when it reports. ``harness_lm`` wraps what the package loads
instead (the teacher, students, quantized and pruned models: anything with ``model(input_ids).logits``)
and tokenizes like ``HFLM`` does (lm-eval's ``TemplateLM``: no special tokens, trailing spaces of the
context moved into the continuation).

Scores are next-token log-probabilities (a log-softmax in fp32 of the model's logits). Requests that
share a context (the choices of a multiple-choice question) are scored with one forward pass over the
context and one over the continuations with its KV cache: for ``pydoc_mc`` (four short names after a docstring) 2.8x fewer
tokens than scoring each pair whole; a model whose ``forward`` takes no ``attention_mask`` /
``position_ids`` / ``use_cache`` is scored pair by pair. lm-eval is optional: nothing here imports it
until a harness model is built.

Reference: L. Gao et al., "The Language Model Evaluation Harness", Zenodo, 2023,
https://github.com/EleutherAI/lm-evaluation-harness (``docs/model_guide.md``: the ``LM`` interface).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..runtime import device_of

__all__ = ["harness_lm", "LM_EVAL_HINT", "MAX_BATCH_TOKENS", "require_lm_eval"]

LM_EVAL_HINT = ("task accuracy runs EleutherAI's lm-evaluation-harness, which is not installed: "
                "pip install lm-eval (or pip install 'distill_lab[eval]')")
_CACHE_KWARGS = {"attention_mask", "position_ids", "use_cache"}
MAX_BATCH_TOKENS = 4096  # rows x longest row per forward, so that logits (rows x T x vocabulary) stay below ~1 GB


def require_lm_eval():
    """Import and return ``lm_eval``; ImportError naming the package to install when it is missing."""
    try:
        import lm_eval  # optional dependency: pip install 'distill_lab[eval]'
    except ImportError:
        raise ImportError(LM_EVAL_HINT) from None
    return lm_eval


def harness_lm(model: nn.Module, tokenizer, batch_size: int = 8, progress: bool = True,
               max_length: int | None = None):
    """An ``lm_eval.api.model.LM`` that scores with ``model`` and ``tokenizer`` (no hub, no download).

    ``batch_size`` contexts are scored per forward pass (fewer when they hold over ``MAX_BATCH_TOKENS``
    tokens); ``max_length`` (default: the model's ``max_position_embeddings``) keeps the last tokens of longer
    inputs, as ``HFLM`` does. The model's train/eval mode is left as it is (the package loads in eval mode).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; allowed: an int >= 1")
    require_lm_eval()
    return _adapter_class()(model, tokenizer, batch_size, progress, max_length)


@functools.cache
def _adapter_class():
    """``ModuleLM``: the scorer below on top of lm-eval's ``TemplateLM`` (built once lm-eval is imported)."""
    from lm_eval.api.model import TemplateLM

    return type("ModuleLM", (_Scorer, TemplateLM), {"__module__": __name__, "__doc__": _Scorer.__doc__})


class _Scorer:
    """Log-likelihoods of token sequences under a package model; the methods lm-eval's ``TemplateLM`` leaves open."""

    def __init__(self, model: nn.Module, tokenizer, batch_size: int, progress: bool, max_length: int | None):
        super().__init__()  # lm-eval's LM: rank 0 of 1
        self.model, self.tokenizer = model, tokenizer  # its train/eval mode is left as the caller set it
        self.batch_size, self.progress = batch_size, progress
        config = getattr(model, "config", None)
        self.max_length = int(max_length or getattr(config, "max_position_embeddings", None) or 2048)
        self._device = device_of(model)
        self.pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        params = inspect.signature(model.forward).parameters
        self.share_context = _CACHE_KWARGS <= set(params)
        self.keep_last = "logits_to_keep" in params

    # ------------------------------------------------------------------ what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``; no special tokens unless asked (the course's ``data.tokenize`` too)."""
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens),
                              return_attention_mask=False)["input_ids"]

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), greedy?)`` per ``((ctx, cont) strings, ctx ids, cont ids)``."""
        pairs = [self._truncate(list(ctx), list(cont)) for _, ctx, cont in requests]
        show = self.progress and not disable_tqdm
        if self.share_context:
            return self._score_shared(pairs, show)
        return self._score_whole(pairs, show)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of ``max_length`` tokens (lm-eval's rule)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((list(ctx), list(cont)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score_whole(windows, self.progress and not disable_tqdm)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "distill_lab's harness model scores log-likelihoods only (output_type multiple_choice, loglikelihood, "
            "loglikelihood_rolling); a generative task (generate_until) needs lm-eval's own HFLM with a hub id")

    # ------------------------------------------------------------------ scoring
    def _truncate(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        if not cont:
            raise ValueError("an lm-eval request with an empty continuation; allowed: at least one token to score")
        whole = (ctx + cont)[-(self.max_length + 1):]
        if len(whole) <= len(cont):
            raise ValueError(f"a continuation of {len(cont)} tokens leaves no context within max_length="
                             f"{self.max_length}; allowed: continuations shorter than max_length")
        return whole[:-len(cont)], cont

    def _chunks(self, items: list, length) -> list[list]:
        """``items`` (longest first) in batches of at most ``batch_size`` rows and ``MAX_BATCH_TOKENS`` tokens."""
        chunks: list[list] = []
        for item in items:
            if chunks and len(chunks[-1]) < self.batch_size \
                    and (len(chunks[-1]) + 1) * length(chunks[-1][0]) <= MAX_BATCH_TOKENS:
                chunks[-1].append(item)
            else:
                chunks.append([item])
        return chunks

    @staticmethod
    def _score(logprobs: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
        """Sum and greedy match of ``cont`` under (len(cont), V) log-probabilities."""
        target = torch.tensor(cont, device=logprobs.device)
        picked = logprobs.gather(-1, target[:, None]).squeeze(-1)
        return float(picked.sum()), bool((logprobs.argmax(-1) == target).all())

    @torch.inference_mode()
    def _score_whole(self, pairs: list[tuple[list[int], list[int]]], show: bool) -> list[tuple[float, bool]]:
        """Each pair in one right-padded forward over ``ctx + cont[:-1]`` (causal: padding after is never seen)."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        chunks = self._chunks(order, lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        for chunk in tqdm(chunks, desc="log-likelihood", leave=False, disable=not show):
            inputs = [pairs[i][0] + pairs[i][1][:-1] for i in chunk]
            ids = torch.full((len(chunk), max(map(len, inputs))), self.pad_id, dtype=torch.long)
            for row, seq in enumerate(inputs):
                ids[row, :len(seq)] = torch.tensor(seq)
            logits = self.model(ids.to(self.device)).logits.float()  # (B, T, V)
            for row, i in enumerate(chunk):
                ctx, cont = pairs[i]
                out[i] = self._score(F.log_softmax(logits[row, len(ctx) - 1:len(ctx) - 1 + len(cont)], -1), cont)
        return out

    @torch.inference_mode()
    def _score_shared(self, pairs: list[tuple[list[int], list[int]]], show: bool) -> list[tuple[float, bool]]:
        """One forward per distinct context (left-padded, KV cache kept), then every continuation on its cache."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(i)
        contexts = sorted(groups, key=lambda c: (-len(c), c))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for chunk in tqdm(self._chunks(contexts, len), desc="log-likelihood", leave=False, disable=not show):
            width = len(chunk[0])  # the longest: contexts are sorted by length
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ctx in enumerate(chunk):
                ids[row, width - len(ctx):], mask[row, width - len(ctx):] = torch.tensor(ctx), 1
            extra = {"logits_to_keep": 1} if self.keep_last else {}
            first = self.model(ids.to(self.device), attention_mask=mask.to(self.device),
                               position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(self.device), use_cache=True,
                               **extra)
            first_logprobs = F.log_softmax(first.logits[:, -1].float(), -1)  # (B, V): the token after each context
            rows = [(row, i) for row, ctx in enumerate(chunk) for i in groups[ctx]]
            longer = [(row, i) for row, i in rows if len(pairs[i][1]) > 1]
            rest = self._continue(first, mask, [len(c) for c in chunk], longer, pairs) if longer else {}
            for row, i in rows:
                cont = pairs[i][1]
                logprobs = first_logprobs[row:row + 1]
                if i in rest:
                    logprobs = torch.cat([logprobs, rest[i]])
                out[i] = self._score(logprobs, cont)
        return out

    def _continue(self, first, mask: torch.Tensor, lengths: list[int], rows: list[tuple[int, int]],
                  pairs) -> dict[int, torch.Tensor]:
        """Log-probabilities of tokens 2.. of each continuation, run on a copy of its context's cache."""
        key = "cache" if "cache" in first else "past_key_values"  # 'cache' from transformers 5.2x
        cache = first[key]
        index = torch.tensor([row for row, _ in rows])
        cache.reorder_cache(index.to(self.device))  # one cache row per continuation
        steps = max(len(pairs[i][1]) for _, i in rows) - 1
        ids = torch.full((len(rows), steps), self.pad_id, dtype=torch.long)  # right-padded: causal, never seen
        for r, (_, i) in enumerate(rows):
            tail = pairs[i][1][:-1]
            ids[r, :len(tail)] = torch.tensor(tail)
        start = torch.tensor(lengths)[index][:, None]
        logits = self.model(ids.to(self.device),
                            attention_mask=torch.cat([mask[index], torch.ones_like(ids)], 1).to(self.device),
                            position_ids=(start + torch.arange(steps)).to(self.device), use_cache=True,
                            **{key: cache}).logits.float()  # (R, steps, V)
        return {i: F.log_softmax(logits[r, :len(pairs[i][1]) - 1], -1) for r, (_, i) in enumerate(rows)}
