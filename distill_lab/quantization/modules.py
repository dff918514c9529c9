"""Quantized layer types: Linear and Embedding modules whose weights live in integer buffers.

* ``Int8WeightOnlyLinear``: int8 weights per output channel (``aten._weight_int8pack_mm``, or a float GEMM on
  the weight dequantized per call).
* ``Int8DynamicLinear``: W8A8, activations quantized per token at run time (``torch._int_mm``, or
  oneDNN's int8 linear on the CPU where it is exact).
* ``Int4WeightOnlyLinear``: group-wise 4-bit weights in the layout of the kernel that runs them (the int4
  kernel, or a float GEMM on the weight dequantized per call).
* ``Int8Embedding``: int8 rows with one scale per token (``embeddings.Int4Embedding``: int4 groups).

On the CPU each Linear asks ``dispatch.kernel_path`` which path to take for the call's phase
(decode: few rows; prefill: many), a choice timed on this machine; every path keeps the same weights.

Each reports its real storage (``storage_bytes``), the weights it stands for (``logical_numel``) and
what a checkpoint needs to rebuild it (``export_tensors``, ``spec``). ``set_module``,
``embedding_and_head`` and ``module_name`` find and swap modules inside a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import embedding_scale
from .dispatch import kernel_path
from .kernels import (W8A8_CHUNK_ELEMENTS, int8_weight_only_backend, int8_weight_only_mm, int_mm, int_mm_ok,
                      kernels_enabled, onednn_int8_pack, quantize_activations, w8a8_int_mm_cpu, w8a8_onednn)
from .int4_kernels import (dequantize_int4, int4_codes_and_scales, int4_layout_for, int4_linear, pack_int4,
                           to_kernel_layout, unpack_int4, unpack_kernel_layout)
from .primitives import Granularity, quantize_tensor

__all__ = ["W8A8_CHUNK_ELEMENTS", "W8A8_ONEDNN_MIN_OUTPUTS", "W8A8_ONEDNN_MIN_ROWS", "Int4WeightOnlyLinear",
           "Int8DynamicLinear", "Int8Embedding", "Int8WeightOnlyLinear", "QuantizedModule", "embedding_and_head",
           "module_name", "set_module"]

# oneDNN's int8 linear, where ``dispatch`` measured it faster, only for large outputs: on an Intel Xeon (AMX),
# torch 2.13, it costs ~50 us per call at any size (``_int_mm``: ~20 us) and 1-10 ms at 1-4 rows with N <= 256
# (decode through k/v_proj); from 256 x 576 outputs up it beats ``_int_mm`` + epilogue (2048 x 1536: 1.0 vs 4.7 ms).
# On an AMD EPYC it takes 3,081 ms where ``_int_mm`` takes 0.89 ms: there ``dispatch`` never chooses it.
W8A8_ONEDNN_MIN_ROWS = 16
W8A8_ONEDNN_MIN_OUTPUTS = 1 << 17


class QuantizedModule(nn.Module):
    """Base class: a module whose weights live in integer buffers; reports its real storage bytes."""

    kind = "quantized"

    def storage_bytes(self) -> int:
        """Bytes of this module's own buffers (what it really holds in memory)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def logical_numel(self) -> int:
        """Number of weights it stands for (to compare with fp32)."""
        raise NotImplementedError

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Device-independent tensors to save (packed codes in the portable layout)."""
        return {name: b for name, b in self.named_buffers(recurse=False)}

    def spec(self) -> dict:
        """JSON-serializable description needed to rebuild the module from ``export_tensors``."""
        raise NotImplementedError


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


class Int8WeightOnlyLinear(QuantizedModule):
    """Linear with int8 weights (N, K) and per-output-channel fp32 scales; bf16 activations."""

    kind = "int8_weight_only"

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)  # (N, K) int8
        self.register_buffer("scales", scales.float().reshape(-1))  # (N,)
        self.register_buffer("bias", None if bias is None else bias.detach().float())  # (N,)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8WeightOnlyLinear":
        """Quantize an ``nn.Linear`` per output channel (symmetric absmax, 8 bits)."""
        q = quantize_tensor(linear.weight, 8, None, True, -1)
        return cls(q.codes, q.scales.reshape(-1), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flatten(x)  # (M, K)
        backend = int8_weight_only_backend(x.device, self.in_features)
        path = kernel_path("int8_weight_only", x2.shape[0], x.device) if backend == "kernel" else None
        y = int8_weight_only_mm(x2, self.weight_int8, self.scales, backend, path).to(x.dtype)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The (N, K) float weight the module computes with."""
        return self.weight_int8.float() * self.scales[:, None]

    def logical_numel(self) -> int:
        return self.weight_int8.numel()

    def spec(self) -> dict:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8DynamicLinear(QuantizedModule):
    """W8A8 Linear: activations quantized per token (or per tensor) at run time, ``torch._int_mm`` in int32.

    An optional ``smooth`` vector (K,) divides the input before quantization (SmoothQuant when
    the factor cannot be folded into the previous layer).

    On the CPU, large outputs (``W8A8_ONEDNN_MIN_ROWS``, ``W8A8_ONEDNN_MIN_OUTPUTS``) run on
    oneDNN's int8 linear when ``dispatch`` timed it faster than ``_int_mm`` on this machine and it
    gives ``_int_mm``'s exact integers (``kernels.onednn_int8_pack`` checks): it applies the weight
    scales inside the kernel, so on an Intel Xeon with AMX the layer costs about what the raw
    ``_int_mm`` costs (issue 18 measured the ``_int_mm`` epilogue at 1.4x the matmul); on an AMD
    EPYC the same call is 3,000x slower, and the timing keeps it off. Same numbers on every path.
    The packed weight is a second in-memory copy of the int8 codes (not a buffer: checkpoints and
    ``storage_bytes`` hold the codes once).
    """

    kind = "int8_dynamic"

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 act_granularity: str = "per_token", smooth: torch.Tensor | None = None):
        super().__init__()
        self.act_granularity = Granularity.parse(act_granularity, "Int8DynamicLinear.act_granularity",
                                                 (Granularity.PER_TOKEN, Granularity.PER_TENSOR))
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)  # (N, K) int8
        self.register_buffer("scales", scales.float().reshape(-1).expand(self.out_features).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float())  # (K,)
        self._onednn = None  # ((weight data_ptr, version), packed weight or None): see _onednn_weight

    def __getstate__(self):  # copies and pickles repack: oneDNN's opaque tensor has no storage to copy
        state = super().__getstate__()
        return {**state, "_onednn": None}

    def _load_from_state_dict(self, *args, **kwargs):  # new codes copied in: pack them again
        self._onednn = None
        super()._load_from_state_dict(*args, **kwargs)

    def _onednn_weight(self):
        """oneDNN's packed copy of ``weight_int8`` (packed again when the codes change), or None if not exact here.

        A change is seen by the tensor's address, its version counter (in-place writes) and
        ``load_state_dict``; inference-mode tensors have no version counter, so there only a new
        tensor or ``load_state_dict`` repacks.
        """
        w = self.weight_int8
        key = (w.data_ptr(), None if w.is_inference() else w._version)
        cached = getattr(self, "_onednn", None)  # absent on modules unpickled from before this attribute
        if cached is None or cached[0] != key:
            self._onednn = (key, onednn_int8_pack(self.weight_int8))
        return self._onednn[1]

    @classmethod
    def from_float(cls, linear: nn.Linear, act_granularity: str = "per_token",
                   weight_granularity: str = "per_channel") -> "Int8DynamicLinear":
        """Quantize an ``nn.Linear``'s weight to int8 (per channel or per tensor, symmetric)."""
        axis = Granularity.parse(weight_granularity, "weight_granularity",
                                 (Granularity.PER_CHANNEL, Granularity.PER_TENSOR)).axis
        q = quantize_tensor(linear.weight, 8, None, True, axis)
        return cls(q.codes, q.scales.reshape(-1), linear.bias, act_granularity)

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, K) float -> int8 codes (M, K) and scales (M, 1) (or (1, 1) per tensor)."""
        return quantize_activations(x2, self.smooth, self.act_granularity == "per_token")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flatten(x)  # (M, K)
        cpu_no_grad = (x2.device.type == "cpu" and x2.shape[0]
                       and not (torch.is_grad_enabled() and x2.requires_grad))
        m, per_token = x2.shape[0], self.act_granularity == "per_token"
        packed = None
        if (cpu_no_grad and kernels_enabled() and m >= W8A8_ONEDNN_MIN_ROWS
                and m * self.out_features >= W8A8_ONEDNN_MIN_OUTPUTS and kernel_path("w8a8", m) == "onednn"):
            packed = self._onednn_weight()
        if packed is not None:  # same numbers in one kernel call: the int32 result is scaled in registers
            y = w8a8_onednn(x2, packed, self.scales, self.smooth, per_token)  # (M, N) float32
            if self.bias is not None:
                y.add_(self.bias)
        elif cpu_no_grad and int_mm_ok(*x2.shape, self.out_features, x2.device):
            # same numbers, without the int32 -> fp32 temporaries
            y = w8a8_int_mm_cpu(x2, self.weight_int8, self.scales, self.smooth, per_token, W8A8_CHUNK_ELEMENTS)
            if self.bias is not None:
                y.add_(self.bias)
        else:
            xq, sx = self.quantize_input(x2)
            acc = int_mm(xq, self.weight_int8.t())  # (M, N) int32; the transposed view is what CUDA wants
            y = torch.mul(acc, self.scales).mul_(sx)  # (M, N) float32
            if self.bias is not None:
                y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The (N, K) float weight (before activation quantization)."""
        w = self.weight_int8.float() * self.scales[:, None]
        return w if self.smooth is None else w * self.smooth

    def logical_numel(self) -> int:
        return self.weight_int8.numel()

    def spec(self) -> dict:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "act_granularity": self.act_granularity.value, "smooth": self.smooth is not None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"W8A8 {self.act_granularity} activations")


class Int4WeightOnlyLinear(QuantizedModule):
    """Linear with group-wise 4-bit weights, two codes per byte, bf16 group scales and zeros.

    The kernel convention is ``w = (q - 8)·scale + zero`` with ``q`` in [0, 15] (tinygemm). The
    packed tensor is in the layout of the kernel that runs it: ``'cpu'``
    (``_weight_int4pack_mm_for_cpu``), ``'cuda'`` (``_weight_int4pack_mm``) or ``'plain'``
    (the pure-PyTorch fallback: unpack, dequantize, matmul). All three hold ``in·out/2`` bytes.
    """

    kind = "int4_weight_only"

    def __init__(self, codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, bits: int = 4, symmetric: bool = False,
                 layout: str | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size, self.bits, self.symmetric = group_size, bits, symmetric
        self.layout = layout or int4_layout_for(codes.device, self.out_features, self.in_features,
                                                group_size)
        self.register_buffer("packed", to_kernel_layout(codes, self.layout))  # in·out/2 bytes
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16).contiguous())  # (K/g, N, 2)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, layout: str,
                    out_features: int, in_features: int) -> Int4WeightOnlyLinear:
        """An asymmetric 4-bit module over codes already packed for ``layout``, using the tensors as they are.

        A tied head built this way shares the int4 embedding's ``packed`` and bf16 (K/g, N, 2)
        ``scales_and_zeros``: one copy in memory and on disk (until a ``repack`` or a move to
        another device gives it its own).
        """
        mod = cls.__new__(cls)
        QuantizedModule.__init__(mod)
        mod.out_features, mod.in_features = out_features, in_features
        mod.group_size, mod.bits, mod.symmetric, mod.layout = group_size, 4, False, layout
        mod.register_buffer("packed", packed)  # in·out/2 bytes, shared
        mod.register_buffer("scales_and_zeros", scales_and_zeros)  # (K/g, N, 2) bf16, shared
        mod.register_buffer("bias", None)
        return mod

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 64, bits: int = 4,
                   symmetric: bool = False) -> "Int4WeightOnlyLinear":
        """Quantize an ``nn.Linear`` group-wise along its input dimension."""
        codes, sz = int4_codes_and_scales(linear.weight, group_size, bits, symmetric)
        return cls(codes, sz, group_size, linear.bias, bits, symmetric)

    def codes(self) -> torch.Tensor:
        """The (N, K) uint8 codes in [0, 15], read back from the packed layout."""
        return unpack_kernel_layout(self.packed, self.layout, self.out_features, self.in_features,
                                     self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        """The (N, K) float weight the kernel computes with (bf16 scales and zeros applied in fp32)."""
        return dequantize_int4(self.codes(), self.group_size, self.scales_and_zeros, torch.float32)

    def repack(self, device: torch.device | str | None = None, layout: str | None = None) -> "Int4WeightOnlyLinear":
        """Move to ``device`` and re-pack for its kernel (or for ``layout``, e.g. 'plain' for the fallback)."""
        device = torch.device(device) if device is not None else self.packed.device
        codes = self.codes().to(device)
        self.layout = layout or int4_layout_for(device, self.out_features, self.in_features, self.group_size)
        self.packed = to_kernel_layout(codes, self.layout)
        self.scales_and_zeros = self.scales_and_zeros.to(device)
        if self.bias is not None:
            self.bias = self.bias.to(device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout != "plain" and self.packed.device.type != self.layout:
            self._repack_in_place()  # moved with .to(device): the layouts differ between devices
        x2, lead = _flatten(x)  # (M, K)
        path = kernel_path("int4", x2.shape[0], x2.device) if self.layout == "cpu" else "kernel"
        y = int4_linear(x2, self.packed, self.group_size, self.scales_and_zeros, self.layout, self.out_features,
                        path).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _repack_in_place(self) -> None:
        """Re-pack a kernel layout that was moved to another device (read back on its home device)."""
        device = self.packed.device
        home = torch.device("cpu") if self.layout == "cpu" else torch.device("cuda")
        codes = unpack_kernel_layout(self.packed.to(home), self.layout, self.out_features,
                                      self.in_features, self.group_size).to(device)
        self.layout = int4_layout_for(device, self.out_features, self.in_features, self.group_size)
        self.packed = to_kernel_layout(codes, self.layout)

    def logical_numel(self) -> int:
        return self.out_features * self.in_features

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = {"packed": pack_int4(self.codes()).cpu()}  # portable layout: (N, K/2), even k low nibble
        sz = self.scales_and_zeros.cpu()
        if self.symmetric:  # zeros are all 0: store scales only
            out["scales"] = sz[..., 0].contiguous()
        else:
            out["scales_and_zeros"] = sz
        if self.bias is not None:
            out["bias"] = self.bias.cpu()
        return out

    @classmethod
    def from_exported(cls, tensors: dict, spec: dict, device) -> "Int4WeightOnlyLinear":
        """Rebuild from ``export_tensors`` output and ``spec`` on ``device``."""
        codes = unpack_int4(tensors["packed"]).to(device)
        if "scales" in tensors:
            s = tensors["scales"]
            sz = torch.stack([s, torch.zeros_like(s)], dim=-1)
        else:
            sz = tensors["scales_and_zeros"]
        bias = tensors.get("bias")
        return cls(codes, sz.to(device), spec["group_size"], None if bias is None else bias.to(device),
                   spec["bits"], spec["symmetric"])

    def spec(self) -> dict:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "group_size": self.group_size, "bits": self.bits, "symmetric": self.symmetric}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int{self.bits} g{self.group_size} {'sym' if self.symmetric else 'asym'}, layout={self.layout}")


class Int8Embedding(QuantizedModule):
    """Token embedding with int8 rows and one fp32 scale per token (per-row absmax)."""

    kind = "int8_embedding"

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, out_dtype=torch.float32,
                 embed_scale: float = 1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.out_dtype = out_dtype
        self.embed_scale = float(embed_scale)  # output factor of scaled embeddings (Gemma: sqrt(hidden))
        self.register_buffer("weight_int8", weight_int8)  # (V, D) int8
        self.register_buffer("scales", scales.float().reshape(-1))  # (V,)

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> "Int8Embedding":
        """Quantize each embedding row symmetrically to int8 (keeping the embedding's output scale, if any)."""
        q = quantize_tensor(emb.weight, 8, None, True, -1)
        return cls(q.codes, q.scales.reshape(-1), emb.weight.dtype, embedding_scale(emb))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_int8).to(self.out_dtype)  # (B, T, D)
        scales = self.scales[ids].unsqueeze(-1)  # (B, T, 1)
        if self.embed_scale != 1.0:
            scales = scales * self.embed_scale
        return rows * scales.to(self.out_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The (V, D) float table the lookup reads (before the output scale of scaled embeddings)."""
        return self.weight_int8.float() * self.scales[:, None]

    def logical_numel(self) -> int:
        return self.weight_int8.numel()

    def spec(self) -> dict:
        return {"kind": self.kind, "num_embeddings": self.num_embeddings, "embed_scale": self.embed_scale,
                "embedding_dim": self.embedding_dim, "out_dtype": str(self.out_dtype).replace("torch.", "")}

    def extra_repr(self) -> str:
        scale = f", x{self.embed_scale:g}" if self.embed_scale != 1.0 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row{scale}"


# ----------------------------------------------------------------------------- finding modules in a model
def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model`` (replacing what was there)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def embedding_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The model's input embedding and output head (None where it has none)."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if get_in else None
    head = get_out() if get_out else None
    return emb, head


def module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    """The dotted name of ``target`` inside ``model`` (None when it is not there)."""
    if target is None:
        return None
    for name, m in model.named_modules():
        if m is target:
            return name
    return None
