"""Structured pruning: remove whole query heads, KV groups, MLP channels or decoder blocks.

The result is a smaller dense model of the same family whose config matches its weights: smaller on
disk and faster everywhere, but it loses more quality and needs healing (distillation back toward
the teacher).

* Width pruning and healing by distillation: Muralidharan et al., 2024, "Compact Language Models
  via Pruning and Knowledge Distillation" (Minitron, arXiv:2407.14679); importance as in
  Molchanov et al., 2019 (first-order Taylor, arXiv:1906.10771) and LLM-Pruner (Ma et al., 2023,
  arXiv:2305.11627).
* Depth pruning by Block Influence: Men et al., 2024, "ShortGPT" (arXiv:2403.03853).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..arch import adapter, parameter_count
from ..calibration import calibration_pass
from ..runtime import device_of
from ..summary import Summary
from .selection import as_batches

__all__ = ["HEAD_GRANULARITIES", "IMPORTANCE_METRICS", "StructuredConfig", "block_influence", "importance",
           "prune_channels", "prune_heads", "prune_layers", "prune_structured", "prune_structured_",
           "select_channels", "select_heads", "select_layers"]

HEAD_GRANULARITIES = ("query", "kv_group")
IMPORTANCE_METRICS = ("l2_norm", "magnitude", "taylor", "activation")
DEFAULT_IMPORTANCE = "l2_norm"


def _check_importance(importance: str) -> None:
    if importance not in IMPORTANCE_METRICS:
        raise ValueError(f"importance={importance!r}; allowed: {', '.join(IMPORTANCE_METRICS)}")


def _check_keep_ratio(keep_ratio, name: str = "keep_ratio") -> None:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise ValueError(f"{name}={keep_ratio!r}; allowed: a number in (0, 1]")


# ----------------------------------------------------------------------------------------------
# Importance scores
# ----------------------------------------------------------------------------------------------

def _views(ad, block, grad: bool = False):
    """Per block: weight views grouped by unit (query head, KV group, MLP channel); ``grad``: their gradients.

    Reducing over the last dims gives one value per unit: ``q`` (H, d, hidden), ``o``
    (hidden, H, d), ``k``/``v`` (G, d, hidden), ``gate``/``up`` (I, hidden), ``down`` (hidden, I).
    Fused projections (Phi-3) are split into row views by the architecture adapter.
    """
    d, H, G = ad.head_dim, ad.heads, ad.kv_heads
    w = {p: ad.weight(block, p, grad) for p in ("q", "k", "v", "o", "gate", "up", "down")}
    return {"q": w["q"].reshape(H, d, -1), "o": w["o"].reshape(w["o"].shape[0], H, d),
            "k": w["k"].reshape(G, d, -1), "v": w["v"].reshape(G, d, -1),
            "gate": w["gate"], "up": w["up"], "down": w["down"]}


def _reduce_units(views: dict[str, torch.Tensor], fn) -> dict[str, torch.Tensor]:
    """Apply a per-element function and sum it per unit; returns head (H,), kv (G,), channel (I,) sums."""
    return {"q": fn(views["q"]).sum((1, 2)), "o": fn(views["o"]).sum((0, 2)),
            "k": fn(views["k"]).sum((1, 2)), "v": fn(views["v"]).sum((1, 2)),
            "gate": fn(views["gate"]).sum(1), "up": fn(views["up"]).sum(1), "down": fn(views["down"]).sum(0)}


def _combine(parts: dict[str, torch.Tensor], n_rep: int, post=None) -> dict[str, torch.Tensor]:
    """Turn per-matrix unit sums into head, KV-group and channel scores (sums of the unit's parameters)."""
    heads = parts["q"] + parts["o"]  # (H,)
    kv = heads.view(-1, n_rep).sum(1) + parts["k"] + parts["v"]  # (G,)
    channels = parts["gate"] + parts["up"] + parts["down"]  # (I,)
    out = {"heads": heads, "kv_groups": kv, "channels": channels}
    return {k: post(v) for k, v in out.items()} if post else out


@torch.no_grad()
def _weight_importance(model, importance):
    ad = adapter(model, "structured pruning")
    blocks, n_rep = ad.blocks, ad.n_rep
    scores = {"heads": [], "kv_groups": [], "channels": []}
    for block in blocks:
        views = {k: v.float() for k, v in _views(ad, block).items()}
        if importance == "l2_norm":  # Euclidean norm of all parameters of the unit
            parts = _reduce_units(views, lambda t: t.pow(2))
            out = _combine(parts, n_rep, post=torch.sqrt)
        else:  # "magnitude": mean |w| over the unit's parameters (L1 per parameter)
            parts = _reduce_units(views, torch.abs)
            counts = _reduce_units(views, torch.ones_like)
            sums, ns = _combine(parts, n_rep), _combine(counts, n_rep)
            out = {k: sums[k] / ns[k] for k in sums}
        for k in scores:
            scores[k].append(out[k])
    return {k: torch.stack(v).cpu() for k, v in scores.items()}


def _taylor_importance(model, batches, progress):
    """|sum over the unit's parameters of grad * weight|, gradients of the LM loss summed over the batches."""
    ad = adapter(model, "structured pruning")
    blocks, n_rep = ad.blocks, ad.n_rep
    device = device_of(model)
    was_training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    saved = {id(p): p.grad for p in model.parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    try:
        for batch in tqdm(batches, desc="taylor", leave=False, disable=not progress):
            batch = batch.to(device)
            loss = model(batch, labels=batch, use_cache=False).loss
            (loss / len(batches)).backward()
        scores = {"heads": [], "kv_groups": [], "channels": []}
        with torch.no_grad():
            for block in blocks:
                views = _views(ad, block)
                grads = _views(ad, block, grad=True)
                prods = {k: (views[k].float() * grads[k].float()) for k in views}
                parts = _reduce_units(prods, lambda t: t)
                out = _combine(parts, n_rep, post=torch.abs)
                for k in scores:
                    scores[k].append(out[k])
    finally:
        for p in model.parameters():
            p.grad = saved[id(p)]
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return {k: torch.stack(v).cpu() for k, v in scores.items()}


@torch.inference_mode()
def _activation_importance(model, batches, progress):
    """Mean activation norms on calibration tokens: per head ``||attn_out_h||_2``, per channel ``|act_j|``."""
    ad = adapter(model, "structured pruning")
    blocks, n_rep = ad.blocks, ad.n_rep
    d, H = ad.head_dim, ad.heads
    sums = {i: {"heads": 0.0, "channels": 0.0} for i in range(len(blocks))}
    handles = []

    def o_hook(i):
        def hook(module, inputs):
            x = inputs[0].detach().float()  # (B, T, H*d)
            sums[i]["heads"] = sums[i]["heads"] + x.reshape(-1, H, d).norm(dim=-1).sum(0)  # (H,)
        return hook

    def down_hook(i):
        def hook(module, inputs):
            x = inputs[0].detach().float()  # (B, T, I)
            sums[i]["channels"] = sums[i]["channels"] + x.reshape(-1, x.shape[-1]).abs().sum(0)  # (I,)
        return hook

    for i, block in enumerate(blocks):
        handles.append(ad.linear(block, "o")[0].register_forward_pre_hook(o_hook(i)))
        handles.append(ad.linear(block, "down")[0].register_forward_pre_hook(down_hook(i)))
    tokens = calibration_pass(model, batches, handles, desc="activation", progress=progress, use_cache=False)
    heads = torch.stack([sums[i]["heads"] / tokens for i in sums]).cpu()  # (L, H)
    channels = torch.stack([sums[i]["channels"] / tokens for i in sums]).cpu()  # (L, I)
    kv = heads.view(len(blocks), -1, n_rep).sum(-1)  # (L, G)
    return {"heads": heads, "kv_groups": kv, "channels": channels}


def importance(model: nn.Module, importance: str = DEFAULT_IMPORTANCE, *, calibration=None,
               progress: bool = False) -> dict[str, torch.Tensor]:
    """Importance of every query head (L, H), KV group (L, G) and MLP channel (L, I); higher = keep.

    * ``l2_norm``: Euclidean norm of the unit's weights (q rows + o columns for a head; plus its
      k and v rows for a KV group; gate and up rows + down column for a channel).
    * ``magnitude``: mean ``|w|`` over the same weights.
    * ``taylor``: ``|sum grad * w|`` over the same weights, the first-order estimate of the loss
      change when the unit is removed; gradients of the LM loss over ``calibration``.
    * ``activation``: mean over calibration tokens of the head's output norm (input of o_proj)
      or of the channel's ``|act(gate x) * up x|`` (input of down_proj); a KV group sums its heads.
    """
    _check_importance(importance)
    if importance in ("l2_norm", "magnitude"):
        return _weight_importance(model, importance)
    batches = as_batches(calibration)
    if importance == "taylor":
        return _taylor_importance(model, batches, progress)
    return _activation_importance(model, batches, progress)


@torch.inference_mode()
def block_influence(model: nn.Module, calibration, progress: bool = False) -> torch.Tensor:
    """ShortGPT Block Influence per decoder block: ``1 - mean_t cos(x_in, x_out)``, shape (L,); low = removable."""
    blocks = adapter(model, "layer pruning").blocks
    batches = as_batches(calibration)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    handles = []

    def hook(i):
        def fn(module, args, kwargs, output):
            x_in = (args[0] if args else kwargs["hidden_states"]).float()  # (B, T, H)
            x_out = (output[0] if isinstance(output, tuple) else output).float()  # (B, T, H)
            sums[i] += (1 - F.cosine_similarity(x_in, x_out, dim=-1)).sum().item()
        return fn

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(hook(i), with_kwargs=True))
    tokens = calibration_pass(model, batches, handles, desc="block influence", progress=progress,
                              use_cache=False)
    return (sums / tokens).float()


# ----------------------------------------------------------------------------------------------
# Which units to keep
# ----------------------------------------------------------------------------------------------

def _n_keep(keep_ratio: float, total: int, what: str) -> int:
    n = int(round(keep_ratio * total))
    if n < 1:
        raise ValueError(f"keep_ratio={keep_ratio} keeps {keep_ratio * total:.2f} of {total} {what}, "
                         f"which rounds to 0; allowed: keep_ratio >= {0.5 / total:.3f} (keep at least one)")
    return min(n, total)


def select_heads(scores_heads: torch.Tensor, scores_kv: torch.Tensor, keep_ratio: float,
                 granularity: str, n_rep: int):
    """Return (heads, kv) kept-index lists per block for query-within-group or whole-KV-group pruning.

    Query heads are listed group-major: kept head ``j`` belongs to kept KV head ``j // (H' / G')``.
    """
    L, H = scores_heads.shape
    G = scores_kv.shape[1]
    heads, kv = [], []
    if granularity == "kv_group":
        n = _n_keep(keep_ratio, G, "KV groups")
        for i in range(L):
            g = torch.sort(torch.topk(scores_kv[i], n).indices).values
            kv.append(g)
            heads.append((g[:, None] * n_rep + torch.arange(n_rep)[None, :]).reshape(-1))
    else:
        n = _n_keep(keep_ratio, n_rep, "query heads per KV group")
        for i in range(L):
            per_group = scores_heads[i].view(G, n_rep)  # (G, n_rep)
            keep = torch.sort(torch.topk(per_group, n, dim=1).indices, dim=1).values  # (G, n)
            heads.append((keep + torch.arange(G)[:, None] * n_rep).reshape(-1))
            kv.append(torch.arange(G))
    return heads, kv


def select_channels(scores: torch.Tensor, keep_ratio: float) -> list[torch.Tensor]:
    """Sorted indices of the MLP channels kept in each block (the same count everywhere)."""
    L, I = scores.shape
    n = _n_keep(keep_ratio, I, "MLP channels")
    return [torch.sort(torch.topk(scores[i], n).indices).values for i in range(L)]


def select_layers(bi: torch.Tensor, keep_ratio: float) -> list[int]:
    """Sorted indices of the blocks kept: the ``keep_ratio`` fraction with the highest Block Influence."""
    n = _n_keep(keep_ratio, len(bi), "layers")
    return sorted(torch.topk(bi, n).indices.tolist())


# ----------------------------------------------------------------------------------------------
# Building the smaller model
# ----------------------------------------------------------------------------------------------

@dataclass
class StructuredConfig:
    """Structured pruning: fractions of query heads / KV groups, MLP channels and layers to keep."""

    heads_keep: float = 1.0  # fraction of heads kept, in (0, 1]
    head_granularity: str = "query"  # "query": query heads within every KV group; "kv_group": whole KV groups
    channels_keep: float = 1.0  # fraction of MLP channels (intermediate size) kept, in (0, 1]
    layers_keep: float = 1.0  # fraction of decoder blocks kept (by Block Influence), in (0, 1]
    importance: str = DEFAULT_IMPORTANCE  # head/channel importance: "l2_norm", "magnitude", "taylor", "activation"

    def __post_init__(self):
        _check_keep_ratio(self.heads_keep, "heads_keep")
        _check_keep_ratio(self.channels_keep, "channels_keep")
        _check_keep_ratio(self.layers_keep, "layers_keep")
        if self.head_granularity not in HEAD_GRANULARITIES:
            raise ValueError(f"head_granularity={self.head_granularity!r}; allowed: {', '.join(HEAD_GRANULARITIES)}")
        _check_importance(self.importance)

    @property
    def needs_calibration(self) -> bool:
        """True when the config needs calibration batches (activation/taylor scores or layer removal)."""
        width = self.heads_keep < 1 or self.channels_keep < 1
        return self.layers_keep < 1 or (width and self.importance in ("taylor", "activation"))


def prune_structured(model: nn.Module, config: StructuredConfig, *, calibration=None,
                     scores: dict[str, torch.Tensor] | None = None, progress: bool = False) -> nn.Module:
    """Return a new, smaller dense model of the same family (the input model is left untouched).

    Heads and channels are ranked within each block by ``config.importance`` (or by precomputed
    ``scores`` from ``importance``) and every block keeps the same number, so one config fits
    all blocks. Layers are ranked by Block Influence on ``calibration``. All scores are taken on
    the input model before anything is removed. The config keeps each kept block's attention type
    (``layer_types``) and the head size.
    """
    if not isinstance(config, StructuredConfig):
        raise ValueError(f"config={config!r}; allowed: StructuredConfig")
    ad = adapter(model, "structured pruning")
    n_rep = ad.config.num_attention_heads // ad.config.num_key_value_heads
    width = config.heads_keep < 1 or config.channels_keep < 1
    if width and scores is None:
        scores = importance(model, config.importance, calibration=calibration, progress=progress)
    layers = list(range(len(ad.blocks)))
    if config.layers_keep < 1:
        layers = select_layers(block_influence(model, as_batches(calibration), progress), config.layers_keep)
    heads = kv = channels = None
    if config.heads_keep < 1:
        heads, kv = select_heads(scores["heads"], scores["kv_groups"], config.heads_keep,
                                 config.head_granularity, n_rep)
        heads, kv = [heads[i] for i in layers], [kv[i] for i in layers]
    if config.channels_keep < 1:
        channels = select_channels(scores["channels"], config.channels_keep)
        channels = [channels[i] for i in layers]
    return ad.shrink(layers, heads, kv, channels)


def prune_structured_(model: nn.Module, config: StructuredConfig, *, calibration=None,
                      scores: dict[str, torch.Tensor] | None = None, progress: bool = False) -> Summary:
    """Structured pruning in place: ``model`` becomes the smaller model ``prune_structured`` returns.

    Its modules, parameters and config are replaced by the smaller model's (same class, device and
    train/eval mode; hooks registered on the old submodules are dropped with them). Returns a
    ``Summary``: ``{"model": fraction of parameters removed}``.
    """
    before = parameter_count(model)
    small = prune_structured(model, config, calibration=calibration, scores=scores, progress=progress)
    for slot in ("_modules", "_parameters", "_buffers"):
        model.__dict__[slot] = small.__dict__[slot]
    model.config = small.config
    return Summary("prune_structured_", dataclasses.asdict(config), {"model": 1 - parameter_count(model) / before},
                   unit="fraction of parameters removed")


def prune_heads(model: nn.Module, keep_ratio: float, importance: str = DEFAULT_IMPORTANCE, *, calibration=None,
                granularity: str = "query", scores=None, progress: bool = False) -> nn.Module:
    """Return a copy keeping ``keep_ratio`` of the query heads in every KV group (or of the KV groups)."""
    _check_keep_ratio(keep_ratio)
    _check_importance(importance)
    return prune_structured(model, StructuredConfig(heads_keep=keep_ratio, head_granularity=granularity,
                                                    importance=importance), calibration=calibration, scores=scores,
                            progress=progress)


def prune_channels(model: nn.Module, keep_ratio: float, importance: str = DEFAULT_IMPORTANCE, *, calibration=None,
                   scores=None, progress: bool = False) -> nn.Module:
    """Return a copy keeping ``keep_ratio`` of the MLP channels (gate, up and down pruned together)."""
    _check_keep_ratio(keep_ratio)
    _check_importance(importance)
    return prune_structured(model, StructuredConfig(channels_keep=keep_ratio, importance=importance),
                            calibration=calibration, scores=scores, progress=progress)


def prune_layers(model: nn.Module, keep_ratio: float, *, calibration, progress: bool = False) -> nn.Module:
    """Return a copy keeping the ``keep_ratio`` fraction of blocks with the highest Block Influence."""
    _check_keep_ratio(keep_ratio)
    return prune_structured(model, StructuredConfig(layers_keep=keep_ratio), calibration=calibration,
                            progress=progress)
