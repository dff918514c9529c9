"""Deployment check: the exported GGUF in llama.cpp against distill_lab, in one run, as ratios.

    python benchmarks/deploy.py [--threads 2] [--rounds 3] [--windows 16] [--gguf FILE]

Always measured (alternating the engines round by round, medians): the distill_lab fp32 and int4 g64
teacher (int4 embedding and tied head too, as in the teacher's own Q4_1 file; ``--embedding-bits 8``
for int8 rows), each through Hugging Face's forward and through the lean ``StaticDecoder``: decode
tok/s at batch 1 and prefill tok/s of 1 x 256 tokens.
With ``llama-cpp-python`` installed (``pip install 'distill_lab[deploy]'``; it builds from source:
``pip install cmake ninja`` and a C++ compiler first, about 20 min on 2 cores, and
``CMAKE_ARGS="-DGGML_NATIVE=ON"`` for this CPU's instructions), llama.cpp columns are added for
the teacher's own Q4_1 GGUF and for the int4 model exported with ``distill_lab.export.to_gguf``,
and perplexity on the same pydoc test windows in both engines (same weights: within 1 %).
Timings depend on what else runs on the machine: run it on an idle one and name the CPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import distill_lab as dl  # noqa: E402
from distill_lab import llamacpp  # noqa: E402
from distill_lab.quantization import Int4WeightOnlyConfig, quantize_  # noqa: E402

# the llama.cpp engine is the package's (distill_lab.llamacpp), the one the claims table times
INSTALL_HINT = "llama.cpp columns skipped: " + llamacpp.INSTALL_HINT
llama_cpp_available = llamacpp.available
LlamaCppEngine = llamacpp.LlamaCppEngine


class TorchEngine:
    """A distill_lab (PyTorch) model with the same three measurements."""

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def nll(self, window: list[int]) -> tuple[float, int]:
        ids = torch.tensor([window])
        logits = self.model(ids).logits.float()[0, :-1]  # (T-1, V)
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")), len(window) - 1

    @torch.inference_mode()
    def prefill_s(self, prompt: list[int]) -> float:
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        self.model(ids, use_cache=False)
        return time.perf_counter() - start

    @torch.inference_mode()
    def decode_s(self, prompt: list[int], tokens: int) -> float:
        out = self.model(torch.tensor([prompt]), use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)  # (1, 1)
        start = time.perf_counter()
        for _ in range(tokens):
            out = self.model(token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start


class LeanEngine(TorchEngine):
    """The same model decoded by ``distill_lab.decode.StaticDecoder`` (static cache, fused projections)."""

    def __init__(self, model, compile: bool = False):
        from distill_lab.decode import StaticDecoder

        super().__init__(model)
        self.decoder = StaticDecoder(model, max_len=1024, compile=compile)

    def decode_s(self, prompt: list[int], tokens: int) -> float:
        return self.decoder.decode_s(torch.tensor([prompt]), tokens)


def perplexity(engine, windows) -> float:
    """exp(mean NLL) over all predicted tokens of ``windows`` (either engine's ``nll``)."""
    return llamacpp.perplexity_of(engine.nll, windows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians are reported)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=256, help="prefill length (batch 1)")
    parser.add_argument("--windows", type=int, default=16, help="pydoc test windows of 256 tokens for perplexity")
    parser.add_argument("--embedding-bits", type=int, default=4, choices=(4, 8),
                        help="the int4 model's embedding and tied head: int4 g64 (all Q4_1 in GGUF, like the "
                             "teacher's own file; default) or int8 rows")
    parser.add_argument("--compile", action="store_true", help="torch.compile the lean decode step (timed once)")
    parser.add_argument("--gguf", default=None, help="an exported GGUF to run in llama.cpp (default: export the "
                                                     "int4 teacher to a temporary file)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = dl.environment_info()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{env.get('cpu', env['device'])}; torch {env['torch']}, {args.threads} threads, load average {load:.1f}")

    teacher, tok = dl.load_teacher(device="cpu")
    int4 = copy.deepcopy(teacher)
    quantize_(int4, Int4WeightOnlyConfig(group_size=64, embedding_bits=args.embedding_bits))
    engines = {"distill_lab fp32": TorchEngine(teacher), "distill_lab int4 g64": TorchEngine(int4),
               "distill_lab fp32 lean": LeanEngine(teacher), "distill_lab int4 lean": LeanEngine(int4, args.compile)}
    if args.compile:
        dec = engines["distill_lab int4 lean"].decoder
        print(f"torch.compile of the decode step: {dec.compile_s:.1f} s once"
              + (f" (failed, eager used: {dec.compile_error})" if hasattr(dec, "compile_error") else ""))
    tmp = None
    if llama_cpp_available():
        from distill_lab.export import to_gguf
        from distill_lab.models import teacher_gguf_path

        path = args.gguf
        if path is None:
            tmp = tempfile.TemporaryDirectory()
            path = os.path.join(tmp.name, "teacher-int4-g64.gguf")
            t0 = time.perf_counter()
            print(to_gguf(int4, tok, path).summary() + f" (exported in {time.perf_counter() - t0:.0f} s)")
        engines["llama.cpp teacher Q4_1"] = LlamaCppEngine(teacher_gguf_path(), args.threads)
        engines["llama.cpp exported int4"] = LlamaCppEngine(path, args.threads)
    else:
        print(INSTALL_HINT)

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, teacher.config.vocab_size, (args.prompt_len,), generator=g).tolist()
    short = prompt[:32]
    for e in engines.values():  # warm-up
        e.prefill_s(prompt)
        e.decode_s(short, 4)
    prefill = {k: [] for k in engines}
    decode = {k: [] for k in engines}
    for _ in range(args.rounds):  # alternate the engines so load changes hit all of them
        for name, e in engines.items():
            prefill[name].append(e.prefill_s(prompt))
            decode[name].append(e.decode_s(short, args.decode_tokens))
    ppl = {}
    if args.windows:
        windows = dl.corpus_windows("pydoc", "test", tok, 256)[:args.windows].tolist()
        ppl = {name: perplexity(e, windows) for name, e in engines.items()}

    ref = "llama.cpp teacher Q4_1" if "llama.cpp teacher Q4_1" in engines else "distill_lab fp32"
    dec = {k: args.decode_tokens / statistics.median(v) for k, v in decode.items()}
    pre = {k: args.prompt_len / statistics.median(v) for k, v in prefill.items()}
    print(f"\nbatch 1; decode {args.decode_tokens} tokens after a 32-token prompt; prefill 1 x {args.prompt_len}; "
          f"medians of {args.rounds} alternating rounds; ratios against {ref}")
    print(f"{'engine':<26} {'decode tok/s':>12} {'ratio':>6} {'prefill tok/s':>13} {'ratio':>6} {'ppl':>7}")
    for name in engines:
        p = f"{ppl[name]:7.2f}" if name in ppl else "      -"
        print(f"{name:<26} {dec[name]:12.1f} {dec[name] / dec[ref]:6.2f} {pre[name]:13.0f} "
              f"{pre[name] / pre[ref]:6.2f} {p}")
    print(f"\nint4 / fp32 in distill_lab: decode {dec['distill_lab int4 g64'] / dec['distill_lab fp32']:.2f}x "
          f"(HF forward), {dec['distill_lab int4 lean'] / dec['distill_lab fp32']:.2f}x (lean int4 vs HF fp32), "
          f"{dec['distill_lab int4 lean'] / dec['distill_lab fp32 lean']:.2f}x (both lean); "
          f"prefill {pre['distill_lab int4 g64'] / pre['distill_lab fp32']:.2f}x")
    if "llama.cpp exported int4" in ppl:
        gap = ppl["llama.cpp exported int4"] / ppl["distill_lab int4 g64"] - 1
        print(f"same weights, two engines: perplexity differs by {100 * gap:+.2f} % (target: within 1 %)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
