"""Activation outliers and the two fixes that move them into the weights: SmoothQuant and AWQ.

* Outlier features: a few hidden channels carry values hundreds of times larger than the rest,
  so one scale per token (or per tensor) wastes most of the int8 grid on them (Dettmers et al.,
  2022, "LLM.int8()", arXiv:2208.07339).
* SmoothQuant (Xiao et al., 2023, arXiv:2211.10438): divide input channel ``j`` by
  ``s_j = max|X_j|^α / max|W_j|^(1-α)`` and multiply the weight's column ``j`` by ``s_j``. The
  product is unchanged, the activations become easier to quantize, and the division is folded
  into the previous RMSNorm (or Linear), so it costs nothing at run time.
* AWQ (Lin et al., 2024, "Activation-aware Weight Quantization", arXiv:2306.00978): for
  weight-only int4, scale up the weight columns that meet large activations,
  ``s = mean|X|^a``, and pick the exponent ``a`` on calibration data by the error of the
  quantized layer's output.

Both work on every family with an architecture adapter (``distill_lab.arch``), with four
"smoothing groups" per block: attention norm → q,k,v; v rows → o_proj (per KV head, GQA);
MLP norm (Gemma: pre_feedforward_layernorm) → gate,up; up rows → down_proj. Norms that apply
``1 + w`` (Gemma) are folded as ``(1 + w) / s - 1``; fused projections (Phi-3) are scaled per row slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import adapter
from .calibration import calibration_pass
from .quantize import clip_weight_, fake_quantize


@dataclass
class ActivationStats:
    """Per-input-channel statistics of every Linear's input, gathered on calibration batches."""

    absmax: dict = field(default_factory=dict)  # name -> (K,) max |x| per input channel
    abssum: dict = field(default_factory=dict)  # name -> (K,) sum |x| per input channel
    samples: dict = field(default_factory=dict)  # name -> (S, K) input rows sampled at random
    tokens: int = 0  # tokens seen per Linear

    def absmean(self, name: str) -> torch.Tensor:
        """(K,) mean |x| per input channel."""
        return self.abssum[name] / max(self.tokens, 1)


@torch.inference_mode()
def collect_activation_stats(model: nn.Module, batches, sample_tokens: int = 256, filter_fn=None,
                             progress: bool = True, seed: int = 0) -> ActivationStats:
    """Run calibration batches (each (B, T) token ids) and record every ``nn.Linear`` input's statistics."""
    stats = ActivationStats()
    batches = list(batches)
    per_batch = max(1, sample_tokens // max(len(batches), 1))
    gen = torch.Generator().manual_seed(seed)
    state = {"rows": None}
    hooks = []

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (N, K)
            a = x.abs()
            m, s = a.amax(0), a.sum(0)
            if name in stats.absmax:
                stats.absmax[name] = torch.maximum(stats.absmax[name], m)
                stats.abssum[name] += s
            else:
                stats.absmax[name], stats.abssum[name] = m, s
            rows = state["rows"][state["rows"] < x.shape[0]]
            picked = x[rows.to(x.device)].cpu()
            stats.samples[name] = picked if name not in stats.samples else \
                torch.cat([stats.samples[name], picked])
        return fn

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (filter_fn is None or filter_fn(module, name)):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    def pick_rows(batch):  # the same sampled rows for every Linear of this batch
        state["rows"] = torch.randperm(batch.numel(), generator=gen)[:per_batch]

    stats.tokens = calibration_pass(model, batches, hooks, progress=progress, before_batch=pick_rows)
    return stats


def outlier_table(stats: ActivationStats) -> list[dict]:
    """One row per Linear: max |x|, mean |x|, their ratio, and the channel holding the max."""
    rows = []
    for name, absmax in stats.absmax.items():
        mean = stats.absmean(name)
        top = int(absmax.argmax())
        rows.append({"layer": name, "max_abs": float(absmax.max()), "mean_abs": float(mean.mean()),
                     "ratio": float(absmax.max() / mean.mean().clamp_min(1e-12)), "top_channel": top,
                     "channels_over_20x_median": int((absmax > 20 * absmax.median()).sum())})
    return rows


# ----------------------------------------------------------------------------- smoothing groups
@dataclass
class SmoothGroup:
    """Linears that read the same input, and where the inverse scale can be folded."""

    name: str  # e.g. "model.layers.3.mlp.down"
    linears: list  # [(name, nn.Linear)] sharing one input
    prev: nn.Module  # RMSNorm (scale its weight) or Linear (scale its output rows)
    kind: str  # 'norm', 'linear' or 'v_to_o' (GQA: one scale per value channel, repeated per query head)
    repeat: int = 1  # query heads per KV head ('v_to_o')
    head_dim: int = 0  # ('v_to_o')
    prev_rows: slice | None = None  # the previous Linear's output rows that feed this group (fused: v of qkv, up of gate_up)
    norm_offset: float = 0.0  # the previous norm computes x_hat * (norm_offset + w) (Gemma: 1)


def smoothing_groups(model: nn.Module, include: tuple = ("qkv", "o", "gate_up", "down")) -> list[SmoothGroup]:
    """The foldable (previous op → Linears) pairs of every block, read from the model's architecture adapter."""
    ad = adapter(model, "smoothing (SmoothQuant / AWQ)")
    groups = []
    prefix = ad.blocks_prefix
    for i, block in enumerate(ad.blocks):
        pre = f"{prefix}.{i}"
        inputs = ad.input_groups(block)

        def named(key):
            return [(f"{pre}.{n}", lin) for n, lin in inputs[key]]

        if "qkv" in include:
            groups.append(SmoothGroup(f"{pre}.self_attn.qkv", named("qkv"), ad.attn_norm(block), "norm",
                                      norm_offset=ad.norm_offset))
        if "o" in include:
            v, v_rows = ad.linear(block, "v")
            groups.append(SmoothGroup(f"{pre}.self_attn.o", named("o"), v, "v_to_o", ad.n_rep, ad.head_dim, v_rows))
        if "gate_up" in include:
            groups.append(SmoothGroup(f"{pre}.mlp.gate_up", named("gate_up"), ad.mlp_norm(block), "norm",
                                      norm_offset=ad.norm_offset))
        if "down" in include:
            up, up_rows = ad.linear(block, "up")
            groups.append(SmoothGroup(f"{pre}.mlp.down", named("down"), up, "linear", prev_rows=up_rows))
    return groups


def _group_scale(group: SmoothGroup, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scale per Linear input channel (K,), scale per folded channel) respecting GQA sharing."""
    if group.kind != "v_to_o":
        return s, s
    # o_proj input channel (query head h, dim d) reads value channel (h // repeat, d): the query
    # heads that share a KV head must share the scale, so take their max
    s_v = s.reshape(-1, group.repeat, group.head_dim).amax(1)  # (kv_heads, head_dim)
    s_in = s_v.repeat_interleave(group.repeat, dim=0)  # (heads, head_dim)
    return s_in.reshape(-1), s_v.reshape(-1)


@torch.no_grad()
def _apply_group_scale(group: SmoothGroup, s_in: torch.Tensor, s_prev: torch.Tensor) -> None:
    """Multiply the Linears' input columns by ``s_in`` and divide the previous op's output by ``s_prev``."""
    for _, lin in group.linears:
        lin.weight.mul_(s_in.to(lin.weight)[None, :])
    if group.kind == "norm":  # the norm's effective gain (offset + w) is divided by s
        w = group.prev.weight
        w.copy_((w.double() + group.norm_offset).div_(s_prev.to(w.device).double()).sub_(group.norm_offset))
    else:  # a Linear: its output rows (a slice of them when fused)
        rows = group.prev_rows if group.prev_rows is not None else slice(None)
        group.prev.weight[rows].div_(s_prev.to(group.prev.weight)[:, None])
        if getattr(group.prev, "bias", None) is not None:
            group.prev.bias[rows].div_(s_prev.to(group.prev.bias))


def _check_alpha(alpha) -> None:
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r}; allowed: a number in [0, 1]")


@torch.no_grad()
def smooth_(model: nn.Module, stats: ActivationStats, alpha: float = 0.5,
            include: tuple = ("qkv", "o", "gate_up", "down")) -> dict[str, torch.Tensor]:
    """SmoothQuant in place: migrate ``alpha`` of the activation range into the weights; returns the scales.

    The float model computes the same function afterwards (up to rounding); only its
    quantization changes. Use the stats of the unsmoothed model, then quantize (e.g. ``Int8Dynamic``).
    """
    _check_alpha(alpha)
    scales = {}
    for group in smoothing_groups(model, include):
        x_max = stats.absmax[group.linears[0][0]].float()  # (K,)
        w_max = torch.stack([lin.weight.abs().amax(0).float().cpu() for _, lin in group.linears]).amax(0)
        s = (x_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)
        s_in, s_prev = _group_scale(group, s)
        _apply_group_scale(group, s_in, s_prev)
        scales[group.name] = s_in
    return scales


def _quant_error(x: torch.Tensor, weights: list[torch.Tensor], refs: list[torch.Tensor], s: torch.Tensor,
                 bits: int, group_size: int, symmetric: bool) -> float:
    """Output error Σ‖x Wᵀ - (x/s) Q(W·s)ᵀ‖² of a group of Linears sharing input ``x`` (S, K); ``refs`` = x Wᵀ."""
    err = 0.0
    xs = x / s  # (S, K)
    for w, ref in zip(weights, refs):
        q = fake_quantize(w * s, bits, group_size, symmetric, axis=-1)  # (N, K)
        err += (xs @ q.t() - ref).pow(2).sum().item()
    return err


@torch.no_grad()
def awq_(model: nn.Module, stats: ActivationStats, group_size: int = 64, bits: int = 4,
         symmetric: bool = False, grid: int = 11, include: tuple = ("qkv", "o", "gate_up", "down"),
         clip: bool = True, progress: bool = True) -> dict[str, float]:
    """AWQ-style scaling in place: per group, ``s = mean|x|^a`` with ``a`` searched on calibration rows.

    For each group the exponent ``a`` in ``linspace(0, 1, grid)`` that minimizes the output
    error of the round-to-nearest quantized Linears is kept (``a = 0`` is plain RTN, so the
    search never does worse on the calibration rows). With ``clip``, each scaled weight is then
    clamped to the per-group range that minimizes its rounding error weighted by ``E[x²]`` (AWQ's
    clipping step; ``quantize_.search_clip_ratios``). Returns ``{group: a}``. Quantize afterwards
    with the same grid (``Int4WeightOnly(group_size, symmetric, bits)``).
    """
    if not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid={grid!r}; allowed: an int >= 2")
    chosen = {}
    groups = smoothing_groups(model, include)
    for group in tqdm(groups, desc="AWQ search", leave=False, disable=not progress):
        first = group.linears[0][0]
        if group.linears[0][1].in_features % group_size:
            continue
        x = stats.samples[first].float()  # (S, K)
        weights = [lin.weight.detach().float().cpu() for _, lin in group.linears]
        refs = [x @ w.t() for w in weights]  # (S, N) float outputs
        mean = stats.absmean(first).float().clamp_min(1e-6)  # (K,)
        if group.kind == "v_to_o":
            mean, _ = _group_scale(group, mean)
        best = (float("inf"), 0.0, None)
        for a in torch.linspace(0, 1, grid).tolist():
            s = mean.pow(a)
            s = s / (s.max() * s.min()).sqrt()  # keep scales centred around 1
            err = _quant_error(x, weights, refs, s, bits, group_size, symmetric)
            if err < best[0]:
                best = (err, a, s)
        _, a, s = best
        s_in, s_prev = _group_scale(group, s)
        _apply_group_scale(group, s_in, s_prev)
        if clip:
            importance = (x / s_in).pow(2).mean(0)  # (K,) E[x²] of the scaled input
            for _, lin in group.linears:
                clip_weight_(lin.weight, bits, group_size, symmetric, importance.to(lin.weight.device))
        chosen[group.name] = a
    return chosen
