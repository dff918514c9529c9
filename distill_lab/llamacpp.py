"""llama.cpp as a third engine beside the Hugging Face forward and ``decode.StaticDecoder``.

llama.cpp (Gerganov et al., https://github.com/ggml-org/llama.cpp) is what Ollama and LM Studio run: a
model ``export.to_gguf`` wrote is decoded by its own ggml kernels (Q4_1, Q8_0, F32). Through
``llama-cpp-python`` (the optional ``deploy`` extra, built from source) this module drives it token by
token, so that its decode can be timed in the same rounds as the other two engines
(``evaluate.compare_speed(..., gguf=...)``) and its perplexity read on the same windows.

Without ``llama-cpp-python`` nothing here is imported: ``available()`` is False and ``INSTALL_HINT`` says
how to get it.
"""

from __future__ import annotations

import ctypes
import math
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .timing import timed

__all__ = ["INSTALL_HINT", "MISSING", "LlamaCppEngine", "available", "llamacpp_decode_probe", "perplexity_of"]

INSTALL_HINT = ("llama-cpp-python is not installed. Install it with\n"
                "  pip install cmake ninja && CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install 'distill_lab[deploy]'\n"
                "(built from source, about 20 min on 2 cores; needs a C++ compiler). If llama.cpp then dies with\n"
                "'Illegal instruction' on a CPU with AMX, rebuild without native AMX (docs/deploy.md).")

# one line for a table or a report (INSTALL_HINT is the whole how-to)
MISSING = "llama-cpp-python is not installed (pip install 'distill_lab[deploy]', docs/deploy.md)"

_GGML_LOG_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_log_callback = None  # kept referenced: llama.cpp calls it from C


def _quiet_logs() -> None:
    """Route llama.cpp's log to stderr for errors only (llama-cpp-python 0.3 maps ggml's levels one off and
    prints warnings such as "n_ctx_per_seq < n_ctx_train" even with ``verbose=False``)."""
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        if level == _GGML_LOG_ERROR:
            print(text.decode("utf-8", "replace"), end="", file=sys.stderr)

    _log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def available() -> bool:
    """True when ``import llama_cpp`` works."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppEngine:
    """llama-cpp-python's ``Llama`` on one GGUF file, driven token by token: perplexity, prefill, greedy decode.

    ``threads`` defaults to torch's thread count, so llama.cpp and PyTorch are timed with the same cores.
    ``logits_all`` keeps every position's logits (needed by ``nll``); a decode-only engine can do without.
    """

    def __init__(self, path: str | Path, threads: int | None = None, n_ctx: int = 512, logits_all: bool = True):
        from llama_cpp import Llama, llama_get_logits_ith

        _quiet_logs()
        self._logits_ith = llama_get_logits_ith  # bound once: _next_token runs inside the timed decode loop
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        if n_ctx < 8:
            raise ValueError(f"n_ctx={n_ctx}; allowed: 8 or more tokens")
        self.path = str(path)
        self.threads = int(threads or torch.get_num_threads())
        self.n_ctx = n_ctx
        self.llm = Llama(model_path=self.path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=self.threads,
                         n_threads_batch=self.threads, logits_all=logits_all, verbose=False)
        self.n_vocab, self.logits_all = self.llm.n_vocab(), logits_all

    def _next_token(self) -> int:
        """Greedy next token after the last ``eval``, read from llama.cpp's own last logits (llama-cpp-python
        fills ``Llama.scores`` only with ``logits_all``: without it, ``scores`` stays zero)."""
        ptr = self._logits_ith(self.llm.ctx, -1)  # the batch's last output
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def close(self) -> None:
        """Free llama.cpp's model and context now (instead of at garbage collection)."""
        self.llm.close()

    def _check_len(self, n: int) -> None:
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens; allowed: at most n_ctx={self.n_ctx} (build the engine with a larger n_ctx)")

    def nll(self, window: list[int]) -> tuple[float, int]:
        """Summed next-token negative log-likelihood of one window and the number of predicted tokens."""
        if not self.logits_all:
            raise ValueError("nll needs every position's logits; allowed: an engine built with logits_all=True")
        self._check_len(len(window))
        self.llm.reset()
        self.llm.eval(window)
        logits = np.asarray(self.llm.scores[:len(window) - 1], dtype=np.float64)  # (T-1, V)
        top = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]  # (T-1,)
        target = np.asarray(window[1:])
        return float((logz - logits[np.arange(len(target)), target]).sum()), len(target)

    def perplexity(self, windows: list[list[int]]) -> float:
        """exp(mean NLL) over every predicted token of ``windows``."""
        return perplexity_of(self.nll, windows)

    def prefill_s(self, prompt: list[int]) -> float:
        """Seconds to evaluate ``prompt`` from an empty cache."""
        self._check_len(len(prompt))
        self.llm.reset()
        return timed(lambda: self.llm.eval(prompt))

    def decode_s(self, prompt: list[int], tokens: int) -> float:
        """Seconds for ``tokens`` greedy decode steps after an untimed ``prompt``."""
        self._check_len(len(prompt) + tokens)
        self.llm.reset()
        self.llm.eval(prompt)
        state = {"token": self._next_token()}

        def steps():
            for _ in range(tokens):
                self.llm.eval([state["token"]])
                state["token"] = self._next_token()

        return timed(steps)

    def generate(self, prompt: list[int], tokens: int) -> list[int]:
        """``prompt`` followed by ``tokens`` greedy tokens (like ``model.generate(do_sample=False)``)."""
        self._check_len(len(prompt) + tokens)
        self.llm.reset()
        self.llm.eval(prompt)
        out = list(prompt)
        for i in range(tokens):
            out.append(self._next_token())
            if i + 1 < tokens:
                self.llm.eval([out[-1]])
        return out


def perplexity_of(nll: Callable[[list[int]], tuple[float, int]], windows: list[list[int]]) -> float:
    """exp(mean NLL) over every predicted token of ``windows``, from an engine's ``nll(window)`` ->
    (summed NLL, predicted tokens): one formula for every engine (``benchmarks/deploy.py`` compares two)."""
    total, count = 0.0, 0
    for w in windows:
        nll_sum, n = nll(w)
        total, count = total + nll_sum, count + n
    return math.exp(total / count)


def llamacpp_decode_probe(path: str | Path, prompt: torch.Tensor, decode_tokens: int,
                          threads: int | None = None) -> Callable[[], float]:
    """A probe timing ``decode_tokens`` greedy llama.cpp steps of the GGUF at ``path`` after the untimed
    ``prompt`` (shape (1, P): the same prompt ``evaluate.phase_probes`` decodes after); ``probe.close()``
    frees the engine."""
    ids = prompt[0].tolist()  # (P,)
    engine = LlamaCppEngine(path, threads=threads, n_ctx=len(ids) + decode_tokens + 8, logits_all=False)

    def probe() -> float:
        return engine.decode_s(ids, decode_tokens)

    probe.close = engine.close
    return probe
