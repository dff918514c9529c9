"""Architecture adapters: where a Hugging Face causal LM keeps its blocks, projections and norms.

Techniques (quantization, pruning, smoothing, students) ask this module instead of assuming
``model.model.layers[i].self_attn.q_proj``. One ``Family`` entry per architecture says:

* the decoder blocks, and each block's attention / MLP projections, with split views of fused
  projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``);
* the norm in front of the attention and of the MLP, and how it applies its weight
  (``w`` or ``1 + w``, Gemma);
* the embedding scale (Gemma multiplies the token embedding by ``sqrt(hidden)``);
* per-layer attention types (``layer_types``: sliding or full attention), and how to rebuild a
  smaller config and state (heads, KV groups, channels, layers).

Layouts that no technique can read correctly (GPT-2's transposed ``Conv1D``, mixture-of-experts
weights stored as 3-D parameters, families without an entry for structure-aware techniques) are
refused with one ``ValueError`` naming the model class and the unsupported part, before any work.

Low level on purpose: imports only torch and transformers.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from .tensors import unique_tensors

__all__ = ["Adapter", "adapter", "check_linear_layout", "decoder_blocks", "embedding_scale", "FAMILIES", "Family",
           "family_of", "linear_like_problems", "parameter_count", "PARAMETER_PARTS", "PARTS", "probe_forward",
           "PROBE_TOKENS", "supported_families", "swap_guard"]

PARTS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps its parts (names relative to a decoder block)."""

    name: str  # short name, e.g. "llama"
    model_types: tuple  # config.model_type values of this family
    qkv: tuple | str = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # a str: one fused Linear
    o: str = "self_attn.o_proj"  # attention output projection
    gate_up: tuple | str = ("mlp.gate_proj", "mlp.up_proj")  # a str: one fused Linear (gate rows first)
    down: str = "mlp.down_proj"  # MLP output projection
    attn_norm: str = "input_layernorm"  # the norm whose output q, k, v read
    mlp_norm: str = "post_attention_layernorm"  # the norm whose output gate, up read
    norm_offset: float = 0.0  # norms compute x_hat * (norm_offset + w)

    @property
    def fused(self) -> bool:
        """True when q/k/v or gate/up live in one fused Linear."""
        return isinstance(self.qkv, str) or isinstance(self.gate_up, str)


_GEMMA = dict(mlp_norm="pre_feedforward_layernorm", norm_offset=1.0)
FAMILIES = {f.name: f for f in (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",)),
    Family("qwen3", ("qwen3",)),
    Family("gemma2", ("gemma2",), **_GEMMA),
    Family("gemma3", ("gemma3_text",), **_GEMMA),
    Family("phi3", ("phi3",), qkv="self_attn.qkv_proj", gate_up="mlp.gate_up_proj"),
)}
_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}

# where the decoder blocks live, for families without an entry (block-wise techniques only)
_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "gpt_neox.layers", "transformer.h", "transformer.blocks")


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def linear_like_problems(model: nn.Module) -> list[str]:
    """Return one line per weight that is not an ``nn.Linear`` but acts as one (Conv1D, 3-D expert weights)."""
    problems = []
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            problems.append(f"{name} (Conv1D, transposed weight)")
            continue
        if isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 3:
                problems.append(f"{name}.{pname} (3-D {tuple(p.shape)} weight: mixture-of-experts)")
    return problems


def check_linear_layout(model: nn.Module, technique: str) -> None:
    """Raise ``ValueError`` when ``technique`` (which works on ``nn.Linear``) would skip linear-like weights."""
    problems = linear_like_problems(model)
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(f"{type(model).__name__}: {technique} supports nn.Linear weights only; unsupported "
                         f"layout: {'; '.join(problems[:3])}{more}. Nothing was changed.")


PROBE_TOKENS = 4  # tokens of the forward that confirms a model still runs after a module swap


def probe_forward(model: nn.Module) -> Exception | None:
    """Run the model on ``PROBE_TOKENS`` token ids; return the exception it raised (None: it ran, or cannot be probed).

    Only models with a ``config.vocab_size`` (Hugging Face causal LMs) are probed.
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    tensor = next(iter(model.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(model.buffers()), None)
    if not isinstance(vocab, int) or vocab < 1 or tensor is None:
        return None
    ids = (torch.arange(PROBE_TOKENS) % vocab).unsqueeze(0).to(tensor.device)  # (1, T)
    try:
        with torch.no_grad():
            model(ids)
    except Exception as err:  # noqa: BLE001 - whatever it is, the swapped model does not run
        return err
    return None


@contextlib.contextmanager
def swap_guard(model: nn.Module, technique: str):
    """Undo the block's module swaps unless the model still runs afterwards (``probe_forward``), then refuse.

    Every submodule and public attribute of ``model`` is remembered before the block; when the block
    raises, or the model ran before but not after, they are put back and a ``ValueError`` names the
    model class, the technique and the error (an exception of the block itself is re-raised as it is).
    In-place changes of tensors are not undone: techniques swap modules and leave the old ones intact.
    """
    modules = dict(model.named_modules())
    attrs = {k: v for k, v in vars(model).items() if not k.startswith("_")}
    ran = probe_forward(model) is None

    def undo() -> None:
        for name, module in sorted(modules.items(), key=lambda kv: kv[0].count(".")):
            if not name:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            if parent._modules.get(child) is not module:
                parent._modules[child] = module
        for key in [k for k in vars(model) if not k.startswith("_") and k not in attrs]:
            delattr(model, key)
        for key, value in attrs.items():
            if vars(model).get(key) is not value:
                setattr(model, key, value)

    try:
        yield
    except BaseException:
        undo()
        raise
    err = probe_forward(model) if ran else None
    if err is not None:
        undo()
        hint = (" (it reads the embedding's .weight: keep the embedding in float, embedding_bits=None)"
                if isinstance(err, AttributeError) and "weight" in str(err) else "")
        raise ValueError(f"{type(model).__name__}: after {technique} swapped its modules the model no longer runs "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:200]}){hint}; the swap was undone, "
                         f"nothing was changed")


def decoder_blocks(model: nn.Module) -> list[nn.Module] | None:
    """Return the decoder blocks of a causal LM (any family with a known block path), or None."""
    for path in _BLOCK_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return list(blocks)
    return None


def family_of(model: nn.Module) -> Family | None:
    """Return the model's ``Family`` entry, or None when its architecture has none."""
    return _BY_MODEL_TYPE.get(getattr(getattr(model, "config", None), "model_type", None))


def supported_families() -> list[str]:
    """Names of the families with a full adapter."""
    return list(FAMILIES)


def embedding_scale(embedding: nn.Module) -> float:
    """The factor the embedding multiplies its rows by (Gemma: sqrt(hidden)), 1.0 for a plain embedding."""
    scale = getattr(embedding, "embed_scale", None)
    if scale is None:
        return 1.0
    return float(scale.item() if isinstance(scale, torch.Tensor) else scale)


class Adapter:
    """A model seen through its family entry: blocks, projection views, norms, shapes, smaller rebuilds."""

    def __init__(self, model: nn.Module, family: Family):
        self.model, self.family, self.config = model, family, model.config
        cfg = self.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.intermediate = cfg.intermediate_size
        self.blocks = list(model.model.layers)
        self.blocks_prefix = "model.layers"

    @property
    def norm_offset(self) -> float:
        """Norms compute ``x_hat * (norm_offset + w)``."""
        return self.family.norm_offset

    @property
    def n_rep(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def _rows(self, part: str) -> tuple[str, slice | None]:
        """(Linear name in the block, its output rows for ``part`` or None for all rows)."""
        f, H, G, d, I = self.family, self.heads, self.kv_heads, self.head_dim, self.intermediate
        if part in ("q", "k", "v"):
            if isinstance(f.qkv, str):
                start = {"q": 0, "k": H * d, "v": (H + G) * d}[part]
                return f.qkv, slice(start, start + (H if part == "q" else G) * d)
            return f.qkv["qkv".index(part)], None
        if part in ("gate", "up"):
            if isinstance(f.gate_up, str):
                return f.gate_up, slice(0, I) if part == "gate" else slice(I, 2 * I)
            return f.gate_up[0 if part == "gate" else 1], None
        if part == "o":
            return f.o, None
        if part == "down":
            return f.down, None
        raise ValueError(f"part={part!r}; allowed: {', '.join(PARTS)}")

    def linear(self, block: nn.Module, part: str) -> tuple[nn.Linear, slice | None]:
        """The Linear that computes ``part`` in ``block`` and its output-row slice (None: all rows)."""
        name, rows = self._rows(part)
        return block.get_submodule(name), rows

    def weight(self, block: nn.Module, part: str, grad: bool = False) -> torch.Tensor:
        """The (out, in) weight (or its gradient) of ``part``: a view of the fused weight's rows when fused."""
        lin, rows = self.linear(block, part)
        w = lin.weight.grad if grad else lin.weight
        return w if rows is None else w[rows]

    def input_groups(self, block: nn.Module) -> dict[str, list[tuple[str, nn.Linear]]]:
        """The Linears that read one input, per group: ``qkv``, ``o``, ``gate_up``, ``down`` (names in the block)."""
        f = self.family
        qkv = [f.qkv] if isinstance(f.qkv, str) else list(f.qkv)
        gate_up = [f.gate_up] if isinstance(f.gate_up, str) else list(f.gate_up)
        return {"qkv": [(n, block.get_submodule(n)) for n in qkv], "o": [(f.o, block.get_submodule(f.o))],
                "gate_up": [(n, block.get_submodule(n)) for n in gate_up],
                "down": [(f.down, block.get_submodule(f.down))]}

    def attn_norm(self, block: nn.Module) -> nn.Module:
        """The norm whose output the q, k, v projections read."""
        return block.get_submodule(self.family.attn_norm)

    def mlp_norm(self, block: nn.Module) -> nn.Module:
        """The norm whose output the gate and up projections read (Gemma: pre_feedforward_layernorm)."""
        return block.get_submodule(self.family.mlp_norm)

    def layer_types(self) -> list | None:
        """Per-layer attention types (e.g. 'sliding_attention' / 'full_attention'), or None."""
        types = getattr(self.config, "layer_types", None)
        return list(types) if types is not None else None

    def smaller_config(self, layers: list[int] | None = None, heads: int | None = None,
                       kv_heads: int | None = None, intermediate: int | None = None):
        """A copy of the config keeping ``layers`` (their layer_types too) and the given widths."""
        cfg = copy.deepcopy(self.config)
        if layers is not None:
            cfg.num_hidden_layers = len(layers)
            types = self.layer_types()
            if types is not None:
                cfg.layer_types = [types[i] for i in layers]
        if heads is not None:
            cfg.num_attention_heads = heads
        if kv_heads is not None:
            cfg.num_key_value_heads = kv_heads
        if intermediate is not None:
            cfg.intermediate_size = intermediate
        cfg.head_dim = self.head_dim  # explicit: hidden_size / heads may no longer equal it
        return cfg

    def _block_state(self, block: nn.Module, hi, gi, ci) -> dict[str, torch.Tensor]:
        """The state of ``block`` keeping query heads ``hi``, KV heads ``gi`` and MLP channels ``ci``."""
        d = self.head_dim
        src = dict(block.state_dict())
        out = dict(src)

        def rows(t, idx, size):  # keep row blocks of `size` rows (works for weights and biases)
            return t.reshape(-1, size, *t.shape[1:])[idx].reshape(-1, *t.shape[1:])

        keep = {"q": (hi, d), "k": (gi, d), "v": (gi, d), "gate": (ci, 1), "up": (ci, 1)}
        for names, parts in ((self.family.qkv, ("q", "k", "v")), (self.family.gate_up, ("gate", "up"))):
            fused = isinstance(names, str)
            for suffix in ("weight", "bias"):
                pieces = []
                for j, part in enumerate(parts):
                    name, sl = self._rows(part)
                    key = f"{name}.{suffix}"
                    if key not in src:
                        break
                    t = src[key] if sl is None else src[key][sl]
                    pieces.append(rows(t, *keep[part]))
                    if not fused:
                        out[key] = pieces[-1]
                else:
                    if fused and pieces:
                        out[f"{names}.{suffix}"] = torch.cat(pieces, 0)
        o = f"{self.family.o}.weight"
        out[o] = src[o].reshape(src[o].shape[0], -1, d)[:, hi].reshape(src[o].shape[0], -1)
        dn = f"{self.family.down}.weight"
        out[dn] = src[dn][:, ci]
        return {k: v.clone() for k, v in out.items()}

    @torch.no_grad()
    def shrink(self, layers: list[int], heads=None, kv=None, channels=None) -> nn.Module:
        """Build a new, smaller model of the same class keeping ``layers`` and per kept block the given index tensors.

        ``heads[i]`` / ``kv[i]`` / ``channels[i]`` are sorted index tensors for kept block ``i``
        (None keeps all). Query heads are listed group-major: kept head ``j`` belongs to kept KV
        head ``j // (H' / G')``.
        """
        H, G, I = self.heads, self.kv_heads, self.intermediate
        new_H = len(heads[0]) if heads is not None else H
        new_G = len(kv[0]) if kv is not None else G
        new_I = len(channels[0]) if channels is not None else I
        if new_H % new_G:
            raise ValueError(f"{new_H} query heads do not divide into {new_G} KV heads (GQA needs H % G == 0)")
        config = self.smaller_config(layers, new_H, new_G, new_I)
        state = {}
        for new_i, old_i in enumerate(layers):
            hi = heads[new_i] if heads is not None else torch.arange(H)
            gi = kv[new_i] if kv is not None else torch.arange(G)
            ci = channels[new_i] if channels is not None else torch.arange(I)
            block_state = self._block_state(self.blocks[old_i], hi, gi, ci)
            state.update({f"{self.blocks_prefix}.{new_i}.{k}": v for k, v in block_state.items()})
        for k, v in self.model.state_dict().items():
            if not k.startswith(self.blocks_prefix + "."):
                state[k] = v.clone()
        param = next(self.model.parameters())
        new = AutoModelForCausalLM.from_config(config, dtype=param.dtype)
        missing, unexpected = new.load_state_dict(state, strict=False)
        tied = getattr(config, "tie_word_embeddings", False)
        missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
        if missing or unexpected:
            raise RuntimeError(f"{type(self.model).__name__} rebuild: missing {missing[:3]}, unexpected {unexpected[:3]}")
        new.tie_weights()
        if getattr(self.model, "generation_config", None) is not None:
            new.generation_config = copy.deepcopy(self.model.generation_config)
        return new.to(param.device).train(self.model.training)


def adapter(model: nn.Module, technique: str = "this technique") -> Adapter:
    """Return the model's ``Adapter``, or raise ``ValueError`` naming the class and what is unsupported."""
    problems = linear_like_problems(model)
    family = family_of(model)
    name = type(model).__name__
    if problems:
        raise ValueError(f"{name}: {technique} does not support this layout: {'; '.join(problems[:3])}"
                         f"{f' and {len(problems) - 3} more' if len(problems) > 3 else ''}. Nothing was changed.")
    if family is None or not isinstance(_get(model, "model.layers"), nn.ModuleList):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"{name} (model_type={model_type!r}): {technique} needs an architecture adapter, and "
                         f"this family has none; supported: {', '.join(FAMILIES)}. Nothing was changed.")
    return Adapter(model, family)


PARAMETER_PARTS = ("total", "embedding", "non_embedding")


@torch.no_grad()
def parameter_count(model_or_config, part: str = "total") -> int:
    """Parameters of a model, or the ones a config implies (counted on a weightless meta model of its family).

    The package's one parameter count. Its rule for tied weights: shared storage counts once
    (``tensors.unique_tensors``), so a tied output head adds nothing. ``part`` is ``"total"``,
    ``"embedding"`` (token embedding and an untied head) or ``"non_embedding"`` (the rest). From a
    config: bias terms where the family has them (Qwen2's q/k/v, ``attention_bias`` / ``mlp_bias``),
    norms and all experts included. A quantized model's packed weights are buffers, not parameters:
    count its config (``pipeline.logical_parameters``).
    """
    if part not in PARAMETER_PARTS:
        raise ValueError(f"part={part!r}; allowed: {', '.join(PARAMETER_PARTS)}")
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_or_config)
    total = sum(p.numel() for p in unique_tensors(model.parameters()))
    if part == "total":
        return total
    heads = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    embedding = sum(p.numel() for p in unique_tensors(p for m in heads for p in m.parameters()))
    return embedding if part == "embedding" else total - embedding
