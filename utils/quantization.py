"""Blockwise 8-bit and 4-bit (NF4) quantisation from scratch, and a linear layer that uses it (lesson 08).

A weight matrix is cut into blocks of `block_size` numbers. Each block is divided by its largest
absolute value (absmax), so it lies in [-1, 1]; every number is then replaced by the index of the
nearest value in a small code book (256 values for 8 bits, 16 for 4 bits). To get the weights
back, look the indices up and multiply by the block's absmax. One outlier only spoils its own
block, not the whole matrix.

* `nf4_code()`: the 16 "NormalFloat" values of QLoRA (Dettmers et al., 2023), built from quantiles
  of a normal distribution because trained weights are roughly normal.
* `quantize_blockwise(w, code="nf4"|"int4"|"int8")` -> `QuantizedTensor`; `dequantize_blockwise(q)`.
* `QuantizedLinear`: a frozen linear layer that stores 4- or 8-bit weights and de-quantises them on
  the fly in forward *and* in backward (saving only the small quantised form for backward).
* `quantize_model(model)`: swap a model's nn.Linear layers for QuantizedLinear (the base of QLoRA),
  with `utils.model_surgery.replace_linear`; `weight_bytes_by_kind(model)` says what that saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.checks import check_choice, check_int
from utils.model_surgery import find_linear, replace_linear, weight_bytes


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values, sorted, in [-1, 1], with an exact zero.

    Quantiles of N(0, 1): 8 for the positive half (the top quantile taken at 0.9677 instead of 1,
    where the quantile would be infinite), 7 for the negative half, and 0; then scaled so that
    the largest is 1. Asymmetric on purpose: 4 bits give 16 values and one of them must be 0.
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083  # (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, as in the QLoRA code
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values > 0
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.max()).float()


def linear_code(bits: int) -> torch.Tensor:
    """Evenly spaced symmetric levels k / (2^(bits-1) - 1), k = -(2^(bits-1) - 1) .. 2^(bits-1) - 1.

    Example: linear_code(2) -> [-1.0, 0.0, 1.0].
    """
    check_int("bits", bits, low=2)
    top = 2 ** (bits - 1) - 1  # int8: 127, int4: 7 (one of the 2^bits codes stays unused)
    return torch.arange(-top, top + 1, dtype=torch.float32) / top


CODES = {"nf4": (4, nf4_code), "int4": (4, lambda: linear_code(4)), "int8": (8, lambda: linear_code(8))}


def _check_code_and_block_size(code, block_size) -> None:
    check_choice("code", code, sorted(CODES))
    check_int("block_size", block_size, low=2, what=" (an even number of weights per block)")
    if block_size % 2:  # 4-bit codes are packed two per byte: a block must not end in half a byte
        raise ValueError(f"block_size must be an even int >= 2, got {block_size!r}")


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # uint8: one code per byte (8 bits) or two per byte (4 bits)
    absmax: torch.Tensor  # (n_blocks,) float32: the scale of each block
    code: torch.Tensor  # (2^bits,) float32 code book
    shape: torch.Size  # of the original tensor
    block_size: int
    bits: int

    def nbytes(self) -> int:
        """Bytes needed to store it (codes + scales; the 16- or 256-entry code book is shared)."""
        return self.codes.numel() * self.codes.element_size() + self.absmax.numel() * self.absmax.element_size()


def quantize_blockwise(w: torch.Tensor, code: str = "nf4", block_size: int = 64) -> QuantizedTensor:
    """Quantise `w` in blocks of `block_size` numbers with the code book `code` ("nf4", "int4", "int8")."""
    _check_code_and_block_size(code, block_size)
    if not isinstance(w, torch.Tensor) or not torch.is_floating_point(w):
        raise TypeError(f"w must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.numel() % block_size:
        raise ValueError(f"w has {w.numel()} numbers, not a multiple of block_size={block_size}")
    bits, make_code = CODES[code]
    book = make_code()
    blocks = w.detach().float().reshape(-1, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]
    # nearest code value: compare against the midpoints between neighbouring values
    midpoints = (book[1:] + book[:-1]) / 2
    idx = torch.bucketize(scaled.reshape(-1), midpoints).to(torch.uint8)  # (n,) in 0..2^bits-1
    if bits == 4:
        idx = idx[0::2] << 4 | idx[1::2]  # two 4-bit codes per byte: (n/2,)
    return QuantizedTensor(idx, absmax, book, w.shape, block_size, bits)


def _byte_table(code: torch.Tensor) -> torch.Tensor:
    """(256, 2): the two values a packed 4-bit byte stands for (high nibble, low nibble)."""
    code = torch.cat([code, code.new_zeros(16 - len(code))])  # int4 uses 15 of the 16 codes
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1)


def dequantize_blockwise(q: QuantizedTensor, dtype=torch.float32) -> torch.Tensor:
    """The float tensor back (with the quantisation error), shaped like the original."""
    book = q.code.to(q.absmax.device)
    if q.bits == 4:  # one lookup per byte gives both of its values
        values = _byte_table(book).to(q.absmax.device).index_select(0, q.codes.int())  # (n/2, 2)
    else:
        values = book.index_select(0, q.codes.int())  # (n,)
    values = values.reshape(-1, q.block_size).mul_(q.absmax[:, None])  # in place: values is a fresh tensor
    return values.reshape(q.shape).to(dtype)


def max_abs_error_bound(q: QuantizedTensor) -> torch.Tensor:
    """Per block, the worst possible |w - dequantize(w)|: half the widest gap of the code book x absmax."""
    half_gap = (q.code[1:] - q.code[:-1]).max() / 2
    return half_gap * q.absmax


class _DequantizedMatmul(torch.autograd.Function):
    """y = x W^T + b with W rebuilt from its quantised form in forward and again in backward.

    Plain autograd would keep the de-quantised W (float32) alive for backward in every layer,
    giving back all the memory quantisation saved; here backward rebuilds it instead.
    """

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        w = layer.dequantized_weight(x.dtype)  # (out, in)
        return F.linear(x, w, layer.bias)

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.layer.dequantized_weight(grad_out.dtype)
        return grad_out @ w, None  # gradient for x only: the base weights are frozen


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear whose weight is stored blockwise-quantised (4 or 8 bits)."""

    def __init__(self, linear: nn.Linear, code: str = "nf4", block_size: int = 64):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantizedLinear wraps an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.code_name, self.block_size = code, block_size
        q = quantize_blockwise(linear.weight.data, code, block_size)
        self.bits = q.bits
        # buffers, not parameters: they move with .to(device) and are saved, but are never trained
        self.register_buffer("codes", q.codes)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("code", q.code)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), requires_grad=False)

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.codes, self.absmax, self.code, torch.Size((self.out_features, self.in_features)),
                               self.block_size, self.bits)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_blockwise(self.quantized(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantizedMatmul.apply(x, self)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, code={self.code_name}, "
                f"block_size={self.block_size}")


def quantize_model(model: nn.Module, code: str = "nf4", block_size: int = 64, skip=("lm_head",)) -> nn.Module:
    """Replace every nn.Linear of `model` (except names in `skip`) by a QuantizedLinear, in place.

    The output layer is skipped by default: in SmolLM2 it shares its weight with the input
    embedding, which stays in float32. The parameters that stay in float are copied into ordinary
    memory (see the comment below), so the float weights really leave memory.
    """
    _check_code_and_block_size(code, block_size)
    names = find_linear(model, skip)
    if not names:
        raise ValueError("the model has no nn.Linear layer to quantise (all skipped or none present)")
    # one layer at a time: its float weight is freed before the next is quantised
    replace_linear(model, names, lambda linear: QuantizedLinear(linear, code, block_size))
    # The float tensors that stay (embedding, norms) may be views of a memory-mapped file (transformers
    # maps safetensors lazily): while one view lives, every page of the file read so far stays resident,
    # the replaced float weights included. A copy in ordinary memory lets the whole mapping go.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model


def weight_bytes_by_kind(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's stored tensors, split into its QuantizedLinear layers and everything else
    (in a quantised SmolLM2: the float32 embedding and norms). Both parts come from
    `utils.model_surgery.weight_bytes`, so a tied weight counts once.

    Example: quantize_model(nn.Sequential(nn.Linear(64, 2, bias=False), nn.LayerNorm(2))) ->
    {"quantized linear": 64 + 8 + 64, "float parameters": 16} (4-bit codes, two block scales and the
    16-value code book; the norm's weight and bias).
    """
    quantized = nn.ModuleList(m for m in model.modules() if isinstance(m, QuantizedLinear))
    linear = weight_bytes(quantized)
    return {"quantized linear": linear, "float parameters": weight_bytes(model) - linear}
