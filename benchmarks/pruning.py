"""Does pruning make the teacher faster? Structured vs unstructured vs 2:4, as ratios from one run.

Prints, against the dense fp32 teacher:
* 50 %-width structured (half the MLP channels, one query head per KV group): a smaller dense
  model, so a real prefill speedup;
* 50 % unstructured, stored dense: the same matrices with zeros in them, so about 1.0x;
* 50 % unstructured, stored as torch CSR: sparse kernels, slower than dense at this sparsity;
* the 2:4 kernel test for one Linear (a real speedup only on CUDA sm80+).

The models are timed interleaved (dense, width, unstructured, dense, ...) so that a busy machine
slows all of them alike. Usage: python benchmarks/pruning.py [--batch 4 --seq 256 --repeats 5]
"""

import argparse
import copy

import torch

import distill_lab as dl
from distill_lab import pruning as P
from distill_lab.evaluate import compare_speed
from distill_lab.speed.pruning import semi_structured_speed


def _ratio(row: dict, base: dict, phase: str) -> str:
    """The row's speed-up with its spread (timed in the same rounds as the dense model), else a plain ratio."""
    if f"{phase}_speedup" in row:
        return f"{row[f'{phase}_speedup']}"
    return f"{row[f'{phase}_tokens_per_s'] / base[f'{phase}_tokens_per_s']:.2f}× (1 round)"


def main():
    """Measure prefill/decode speed and size of dense vs pruned teachers and print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--csr", action="store_true", help="also time the CSR-stored model (slow)")
    args = ap.parse_args()

    teacher, _ = dl.load_teacher(device="cpu" if not torch.cuda.is_available() else None)
    env = dl.environment_info()
    print(f"device: {env['device']} | threads: {env['cpu_threads']} | torch {env['torch']}")

    width50 = P.prune_structured(teacher, P.StructuredConfig(heads_keep=1 / 3, channels_keep=0.5,
                                                             importance="l2_norm"))
    unstructured = copy.deepcopy(teacher)
    P.prune_(unstructured, P.MagnitudeConfig(0.5))  # speed does not depend on which weights are zero
    models = {"dense": teacher, "width 50% (structured)": width50,
              "unstructured 50% (stored dense)": unstructured}
    speed = compare_speed(models, batch=args.batch, seq=args.seq, decode_tokens=args.decode,
                          repeats=args.repeats, baseline="dense")
    sizes = {name: dl.weights_bytes(m) for name, m in models.items()}
    sizes_sparse = {"unstructured 50% (stored dense)": P.sparse_bytes_on_disk(unstructured)}
    if args.csr:
        csr = copy.deepcopy(unstructured)
        P.to_sparse_csr_(csr)
        name = "unstructured 50% (torch CSR)"
        speed.update(compare_speed({name: csr}, batch=args.batch, seq=args.seq,
                                   decode_tokens=4, repeats=1, warmup=0))
        sizes[name] = sizes["unstructured 50% (stored dense)"]

    base = speed["dense"]
    print(f"\n{'model':34}{'params':>9}{'disk MB':>9}{'prefill tok/s':>15}{'decode tok/s':>14}"
          f"{'prefill x (IQR)':>22}{'decode x (IQR)':>22}{'size x':>8}")
    for name, s in speed.items():
        m = models.get(name, unstructured)
        n = sum(p.numel() for p in m.parameters())
        print(f"{name:34}{n / 1e6:>8.1f}M{sizes[name] / 1e6:>9.1f}{s['prefill_tokens_per_s']:>15.0f}"
              f"{s['decode_tokens_per_s']:>14.1f}"
              f"{_ratio(s, base, 'prefill'):>22}{_ratio(s, base, 'decode'):>22}"
              f"{sizes['dense'] / sizes[name]:>7.2f}x")
    name = "unstructured 50% (stored dense)"
    print(f"{'  same, saved as bitmask + values':34}{'':>9}{sizes_sparse[name] / 1e6:>9.1f}"
          f"{'':>15}{'':>14}{'':>11}{'':>10}{sizes['dense'] / sizes_sparse[name]:>7.2f}x")

    kernel = semi_structured_speed()
    print(f"\n2:4 kernel, one Linear {kernel['shape']} on {kernel['device']} ({kernel['dtype']}): "
          f"2:4 speedup {kernel['speedup_24']}" +
          (f", CSR speedup {kernel['speedup_csr']}" if "speedup_csr" in kernel else "") +
          f" -- {kernel['kernel']}")

    w = speed["width 50% (structured)"]["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
    u = speed[name]["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
    print(f"\nRATIO structured width 50% prefill speedup over dense: {w:.2f}x (a smaller dense model)")
    print(f"RATIO unstructured 50% (stored dense) prefill speedup over dense: {u:.2f}x "
          f"(zeros still multiplied: no speedup)")
    print(f"(prefill batch {args.batch} x {args.seq}, decode batch 1 x {args.decode} tokens, fp32, "
          f"median of {args.repeats}, models timed interleaved)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
