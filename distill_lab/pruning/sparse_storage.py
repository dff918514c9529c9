"""What zeros cost and save: sparse storage formats, a sparse model file, CSR and 2:4 layers.

Unstructured and 2:4 pruning only write zeros. Stored dense, the model has the same size and the
same speed. Stored sparse (CSR, bitmask) it can be smaller on disk, but CSR with int64 indices is
*larger* than dense at 50 % sparsity, and sparse CPU kernels are slower than dense ones at that
sparsity. Only 2:4 on a CUDA sm80+ GPU (``torch.sparse.to_sparse_semi_structured``) has a kernel
that is faster.

Low on purpose: knows layers only through ``filter_fn`` (``selection``), never how they were pruned.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .._folder import check_model_folder
from .._fs import atomic_folder
from ..summary import Summary
from ..tensors import storage_key
from .masks import is_nm_sparse
from .selection import prunable_linears, resolve_filter

__all__ = ["CSRLinear", "SPARSE_FORMAT_TAG", "STORAGE_FORMATS", "load_sparse", "save_sparse",
           "semi_structured_available", "sparse_bytes", "sparse_bytes_on_disk", "sparsity_stats",
           "to_semi_structured_", "to_sparse_csr_"]

STORAGE_FORMATS = ("dense", "csr", "csr_int32", "bitmask")
SPARSE_FORMAT_TAG = "distill_lab-sparse-bitmask-v1"


# ----------------------------------------------------------------------------------------------
# Sparsity statistics
# ----------------------------------------------------------------------------------------------

def sparse_bytes(numel: int, nnz: int, rows: int, element_size: int, fmt: str) -> int:
    """Bytes needed to store a (rows, numel/rows) matrix with ``nnz`` non-zeros in a storage format.

    ``dense``: every element. ``csr``: values + int64 column indices + int64 row pointers
    (torch's default). ``csr_int32``: the same with int32 indices. ``bitmask``: values + one bit
    per element.
    """
    if fmt == "dense":
        return numel * element_size
    if fmt == "csr":
        return nnz * (element_size + 8) + (rows + 1) * 8
    if fmt == "csr_int32":
        return nnz * (element_size + 4) + (rows + 1) * 4
    if fmt == "bitmask":
        return nnz * element_size + (numel + 7) // 8
    raise ValueError(f"fmt={fmt!r}; allowed: {', '.join(STORAGE_FORMATS)}")


@torch.no_grad()
def sparsity_stats(model: nn.Module, filter_fn=None) -> dict:
    """Per-layer and total sparsity of the prunable Linear weights, and what sparse storage would save.

    Returns ``{"layers": {name: {numel, zeros, sparsity}}, "linear": {...}, "model": {...}}``.
    ``linear`` sums the Linear weights ``filter_fn`` selects (default: all but the head and the
    embeddings); ``model`` counts every unique parameter, with those weights stored in each format of
    ``STORAGE_FORMATS`` and everything else dense. ``compression_<fmt>`` is dense bytes / bytes in
    that format (above 1 means smaller).
    """
    layers = {}
    fmt_bytes = {f: 0 for f in STORAGE_FORMATS}
    numel_sum = zeros_sum = 0
    seen = set()
    for name, lin in prunable_linears(model, resolve_filter(filter_fn)).items():
        w = lin.weight
        seen.add(id(w))
        numel, zeros = w.numel(), int((w == 0).sum())
        layers[name] = {"numel": numel, "zeros": zeros, "sparsity": zeros / numel}
        numel_sum += numel
        zeros_sum += zeros
        for f in STORAGE_FORMATS:
            fmt_bytes[f] += sparse_bytes(numel, numel - zeros, w.shape[0], w.element_size(), f)
    other_bytes = other_numel = other_zeros = 0
    for p in model.parameters():
        if id(p) not in seen:
            other_bytes += p.numel() * p.element_size()
            other_numel += p.numel()
            other_zeros += int((p == 0).sum())
    linear = {"numel": numel_sum, "zeros": zeros_sum, "sparsity": zeros_sum / max(numel_sum, 1)}
    linear.update({f"bytes_{f}": b for f, b in fmt_bytes.items()})
    linear.update({f"compression_{f}": fmt_bytes["dense"] / b for f, b in fmt_bytes.items() if b})
    total = numel_sum + other_numel
    whole = {"numel": total, "zeros": zeros_sum + other_zeros,
             "sparsity": (zeros_sum + other_zeros) / max(total, 1)}
    whole.update({f"bytes_{f}": b + other_bytes for f, b in fmt_bytes.items()})
    whole.update({f"compression_{f}": (fmt_bytes["dense"] + other_bytes) / (b + other_bytes)
                  for f, b in fmt_bytes.items()})
    return {"layers": layers, "linear": linear, "model": whole}


# ----------------------------------------------------------------------------------------------
# A sparse model file: bitmask + non-zero values
# ----------------------------------------------------------------------------------------------

def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared tensors); the first name wins."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def save_sparse(model: nn.Module, folder: str | Path, min_sparsity: float = 0.25, filter_fn=None) -> int:
    """Save a pruned model with its sparse Linear weights as bitmask + non-zero values; return weight bytes.

    Weights of the layers ``filter_fn`` selects (default: all but the head and the embeddings) with at
    least ``min_sparsity`` zeros are stored as a packed bitmask (1 bit per element) plus their
    non-zero values; all else is stored dense. The folder holds ``model.safetensors`` and
    ``config.json``; ``load_sparse`` rebuilds the dense model. Written atomically (temp folder, then
    rename).
    """
    folder = Path(folder)
    sparse_names = set()
    for name, lin in prunable_linears(model, resolve_filter(filter_fn)).items():
        if (lin.weight == 0).float().mean().item() >= min_sparsity:
            sparse_names.add(f"{name}.weight")
    tensors = {}
    for name, t in _unique_state_dict(model).items():
        if name in sparse_names:
            keep = (t != 0).numpy().reshape(-1)
            tensors[f"{name}::mask"] = torch.from_numpy(np.packbits(keep))
            tensors[f"{name}::values"] = t.reshape(-1)[torch.from_numpy(keep)]
            tensors[f"{name}::shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
        else:
            tensors[name] = t
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": SPARSE_FORMAT_TAG})
        model.config.to_json_file(str(tmp / "config.json"))
    return (folder / "model.safetensors").stat().st_size


def load_sparse(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by ``save_sparse`` back as a dense ``LlamaForCausalLM``."""
    folder = Path(folder)
    path = folder / "model.safetensors"
    check_model_folder(folder)  # checksums, headers and config sizes, before the model is built
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("format") != SPARSE_FORMAT_TAG:
            raise ValueError(f"{path} was not written by save_sparse (format tag missing)")
        raw = {k: f.get_tensor(k) for k in f.keys()}
    state = {}
    for key, t in raw.items():
        if "::" not in key:
            state[key] = t
        elif key.endswith("::mask"):
            name = key[: -len("::mask")]
            shape = raw[f"{name}::shape"].tolist()
            numel = int(np.prod(shape))
            keep = torch.from_numpy(np.unpackbits(t.numpy(), count=numel).astype(bool))
            values = raw[f"{name}::values"]
            dense = torch.zeros(numel, dtype=values.dtype)
            dense[keep] = values
            state[name] = dense.reshape(shape)
    config = AutoConfig.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"sparse model folder {str(folder)!r} does not match its config: missing tensors "
                         f"{missing[:3]} ({len(missing)}), unexpected tensors {unexpected[:3]} ({len(unexpected)})")
    model.tie_weights()
    return model.to(device).eval()


def sparse_bytes_on_disk(model: nn.Module, filter_fn=None) -> int:
    """Bytes of the weights file ``save_sparse`` writes for this model (bitmask + values)."""
    with tempfile.TemporaryDirectory() as tmp:
        return save_sparse(model, Path(tmp) / "m", filter_fn=resolve_filter(filter_fn))


# ----------------------------------------------------------------------------------------------
# Sparse layers: CSR on any device, 2:4 on CUDA (sm80+)
# ----------------------------------------------------------------------------------------------

class CSRLinear(nn.Module):
    """A Linear whose weight is stored as a torch sparse CSR matrix (what "stored sparse" runs like on a CPU)."""
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_csr", linear.weight.detach().float().to_sparse_csr())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # (N, in)
        y = torch.sparse.mm(self.weight_csr, x2.t()).t()  # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def to_sparse_csr_(model: nn.Module, filter_fn=None, min_sparsity: float = 0.25) -> Summary:
    """Replace each pruned Linear by a ``CSRLinear`` in place (for timing sparse kernels).

    Only layers ``filter_fn`` selects (default: all but the head and the embeddings) with at least
    ``min_sparsity`` zeros are replaced. Returns a ``Summary``: {replaced layer: its sparsity}, and the
    selected layers kept dense with their reason.
    """
    summary = Summary("to_sparse_csr_", {"min_sparsity": min_sparsity}, unit="sparsity")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        for name, lin in list(prunable_linears(model, resolve_filter(filter_fn)).items()):
            sparsity = (lin.weight == 0).float().mean().item()
            if sparsity < min_sparsity:
                summary.kept[name] = f"sparsity {sparsity:.2f} < min_sparsity={min_sparsity}"
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, CSRLinear(lin))
            summary.changed[name] = sparsity
    return summary


def semi_structured_available() -> tuple[bool, str]:
    """Return ``(True, reason)`` when a 2:4 sparse kernel exists here (CUDA sm80+), else ``(False, why not)``."""
    if not torch.cuda.is_available():
        return False, "no CUDA device: PyTorch has no 2:4 sparse kernel on the CPU"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"CUDA capability sm{major}{minor} < sm80: no 2:4 sparse tensor cores"
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return False, "this torch build lacks torch.sparse.to_sparse_semi_structured"
    return True, f"CUDA sm{major}{minor}: 2:4 sparse tensor cores"


def to_semi_structured_(model: nn.Module, filter_fn=None) -> Summary:
    """Convert every 2:4-sparse Linear weight (CUDA, fp16/bf16) to a semi-structured sparse tensor, in place.

    Only layers ``filter_fn`` selects (default: all but the head and the embeddings) are looked at.
    Returns a ``Summary``: {converted layer: "2:4"}, and the selected layers that are not 2:4 sparse.
    """
    filter_fn = resolve_filter(filter_fn)
    ok, why = semi_structured_available()
    if not ok:
        raise RuntimeError(f"to_semi_structured_ needs CUDA sm80+: {why}")
    from torch.sparse import to_sparse_semi_structured

    summary = Summary("to_semi_structured_", unit="pattern")
    for name, lin in prunable_linears(model, filter_fn).items():
        w = lin.weight
        if w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"weight on {w.device} in {w.dtype}; allowed: CUDA with float16/bfloat16 "
                             "(call model.half().cuda() first)")
        if is_nm_sparse(w, 2, 4):
            lin.weight = nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
            summary.changed[name] = "2:4"
        else:
            summary.kept[name] = "not 2:4 sparse"
    return summary
