"""Activation outliers and SmoothQuant, which moves them into the weights; the smoothing groups AWQ shares.

* Outlier features: a few hidden channels carry values hundreds of times larger than the rest,
  so one scale per token (or per tensor) wastes most of the int8 grid on them (Dettmers et al.,
  2022, "LLM.int8()", arXiv:2208.07339).
* SmoothQuant (Xiao et al., 2023, arXiv:2211.10438): divide input channel ``j`` by
  ``s_j = max|X_j|^α / max|W_j|^(1-α)`` and multiply the weight's column ``j`` by ``s_j``. The
  product is unchanged, the activations become easier to quantize, and the division is folded
  into the previous RMSNorm (or Linear), so it costs nothing at run time.

It works on every family with an architecture adapter (``distill_lab.arch``), with four
"smoothing groups" per block: attention norm → q,k,v; v rows → o_proj (per KV head, GQA);
MLP norm (Gemma: pre_feedforward_layernorm) → gate,up; up rows → down_proj. Norms that apply
``1 + w`` (Gemma) are folded as ``(1 + w) / s - 1``; fused projections (Phi-3) are scaled per row
slice. AWQ (``distill_lab.quantization.awq``) scales the same groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import adapter
from ..calibration import calibration_pass
from ..summary import Summary
from .configs import SmoothQuantConfig

__all__ = ["ActivationStats", "SmoothGroup", "apply_group_scale", "collect_activation_stats",
           "group_scale", "outlier_table", "smooth_", "smoothing_groups",
           "stats_for"]


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


def smoothing_groups(model: nn.Module, filter_fn=None) -> list[SmoothGroup]:
    """The foldable (previous op → Linears) pairs of every block, read from the model's architecture adapter.

    ``filter_fn(module, name)``: a group is kept when it selects every Linear of the group (default: all).
    """
    ad = adapter(model, "smoothing (SmoothQuant / AWQ)")
    groups = []
    prefix = ad.blocks_prefix
    for i, block in enumerate(ad.blocks):
        pre = f"{prefix}.{i}"
        inputs = ad.input_groups(block)

        def named(key):
            return [(f"{pre}.{n}", lin) for n, lin in inputs[key]]

        v, v_rows = ad.linear(block, "v")
        up, up_rows = ad.linear(block, "up")
        groups += [SmoothGroup(f"{pre}.self_attn.qkv", named("qkv"), ad.attn_norm(block), "norm",
                               norm_offset=ad.norm_offset),
                   SmoothGroup(f"{pre}.self_attn.o", named("o"), v, "v_to_o", ad.n_rep, ad.head_dim, v_rows),
                   SmoothGroup(f"{pre}.mlp.gate_up", named("gate_up"), ad.mlp_norm(block), "norm",
                               norm_offset=ad.norm_offset),
                   SmoothGroup(f"{pre}.mlp.down", named("down"), up, "linear", prev_rows=up_rows)]
    if filter_fn is not None:
        groups = [g for g in groups if all(filter_fn(lin, name) for name, lin in g.linears)]
    return groups


def group_scale(group: SmoothGroup, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scale per Linear input channel (K,), scale per folded channel) respecting GQA sharing."""
    if group.kind != "v_to_o":
        return s, s
    # o_proj input channel (query head h, dim d) reads value channel (h // repeat, d): the query
    # heads that share a KV head must share the scale, so take their max
    s_v = s.reshape(-1, group.repeat, group.head_dim).amax(1)  # (kv_heads, head_dim)
    s_in = s_v.repeat_interleave(group.repeat, dim=0)  # (heads, head_dim)
    return s_in.reshape(-1), s_v.reshape(-1)


@torch.no_grad()
def apply_group_scale(group: SmoothGroup, s_in: torch.Tensor, s_prev: torch.Tensor) -> None:
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


@torch.no_grad()
def smooth_(model: nn.Module, config: SmoothQuantConfig | None = None, *, calibration=None,
            stats: ActivationStats | None = None, filter_fn=None, progress: bool = False) -> Summary:
    """SmoothQuant in place: migrate ``config.alpha`` of the activation range into the weights.

    ``calibration``: token batches, each (B, T) ids, run once through the unsmoothed model for the
    activation ranges; or pass ``stats``, the ``ActivationStats`` of ``collect_activation_stats``
    (handy to sweep alpha). ``filter_fn(module, name)`` picks the smoothing groups (all their
    Linears must be selected; default all). The float model computes the same function afterwards
    (up to rounding); only its quantization changes. Quantize afterwards (e.g. ``Int8DynamicConfig``).
    Returns a ``Summary``: {group: its (K,) input scale}.
    """
    config = SmoothQuantConfig() if config is None else config
    if not isinstance(config, SmoothQuantConfig):
        raise ValueError(f"config={config!r}; allowed: a SmoothQuantConfig (or None for the default alpha 0.5)")
    stats = stats_for(model, calibration, stats, progress)
    alpha = config.alpha
    scales = Summary("smooth_", {"type": type(config).__name__, "alpha": alpha}, unit="input scale")
    for group in smoothing_groups(model, filter_fn):
        x_max = stats.absmax[group.linears[0][0]].float()  # (K,)
        w_max = torch.stack([lin.weight.abs().amax(0).float().cpu() for _, lin in group.linears]).amax(0)
        s = (x_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)
        s_in, s_prev = group_scale(group, s)
        apply_group_scale(group, s_in, s_prev)
        scales.changed[group.name] = s_in
    return scales


def stats_for(model: nn.Module, calibration, stats: ActivationStats | None, progress: bool = False) -> ActivationStats:
    """``stats`` as given, else collected on ``calibration`` (token batches); a ValueError names what is wrong."""
    if stats is not None:
        if calibration is not None:
            raise ValueError("pass calibration (token batches) or stats (their ActivationStats), not both")
        if not isinstance(stats, ActivationStats):
            raise ValueError(f"stats={type(stats).__name__}; allowed: the ActivationStats of "
                             "collect_activation_stats(model, batches)")
        return stats
    if isinstance(calibration, ActivationStats):
        raise ValueError("calibration is token batches; pass precomputed ActivationStats as stats=")
    if calibration is None:
        raise ValueError("calibration=None; allowed: token batches, each (B, T) ids (or stats=ActivationStats)")
    return collect_activation_stats(model, calibration, progress=progress)
