"""Bit packing of b-bit codes into bytes, row by row, with torch ops on any device.

Codes are packed along the last axis: a row of m codes becomes ceil(m / 8) * b bytes (eight
b-bit codes fill exactly b bytes). Head dimensions are multiples of 8 in practice, so rows pack
with no padding at all; otherwise the < 8 padding codes per row are stored and counted.
Rows stay byte-aligned so a cache can append and slice tokens without re-packing.
"""

from __future__ import annotations

import functools
import sys

import torch

from ..core.errors import SeqkvError


def packed_row_bytes(m: int, bits: int) -> int:
    """Bytes one row of m b-bit codes takes."""
    return m if bits == 8 else -(-m // 8) * bits


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise SeqkvError(f"can pack 1..8-bit codes, got {bits}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last axis into uint8."""
    _check_bits(bits)
    *lead, m = codes.shape
    if bits == 8:
        return codes.to(torch.uint8)
    g = -(-m // 8)
    c = codes.to(torch.uint8)
    if g * 8 != m:
        c = torch.nn.functional.pad(c, (0, g * 8 - m))
    if bits in (1, 2, 4):
        # Byte-aligned widths: 8/b codes per byte, combined with uint8 shifts (no widening).
        per = 8 // bits
        c = c.reshape(*lead, g * bits, per)
        out = c[..., 0].clone()
        for j in range(1, per):
            out |= c[..., j] << (bits * j)
        return out
    if bits == 3:
        # The common fractional-byte width gets a uint8-only path: 8 codes -> 3 bytes.
        c = c.reshape(*lead, g, 8)
        c0, c1, c2, c3, c4, c5, c6, c7 = c.unbind(-1)
        b0 = c0 | (c1 << 3) | ((c2 & 3) << 6)
        b1 = (c2 >> 2) | (c3 << 1) | (c4 << 4) | ((c5 & 1) << 7)
        b2 = (c5 >> 1) | (c6 << 2) | (c7 << 5)
        return torch.stack([b0, b1, b2], dim=-1).reshape(*lead, g * 3)
    # 5, 6, 7 bits: eight codes make one (8b)-bit word, written out as b bytes.
    wide = torch.int64 if bits > 3 else torch.int32
    c = c.reshape(*lead, g, 8).to(wide)
    word = c[..., 0]
    for j in range(1, 8):
        word = word | (c[..., j] << (bits * j))
    shifts = torch.arange(0, 8 * bits, 8, device=codes.device, dtype=wide)
    return ((word.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(*lead, g * bits)


def unpack(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 rows back to m codes per row (uint8)."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise SeqkvError(f"packed codes must be uint8, got {packed.dtype}")
    *lead, nbytes = packed.shape
    if nbytes != packed_row_bytes(m, bits):
        raise SeqkvError(
            f"packed row has {nbytes} bytes, expected {packed_row_bytes(m, bits)} "
            f"for {m} x {bits}-bit codes"
        )
    if bits == 8:
        return packed
    g = -(-m // 8)
    mask = (1 << bits) - 1
    if bits in (1, 2, 4):
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        out = (packed.unsqueeze(-1) >> shifts) & mask
        return out.reshape(*lead, g * 8)[..., :m]
    wide = torch.int64 if bits > 3 else torch.int32
    b = packed.reshape(*lead, g, bits).to(wide)
    word = b[..., 0]
    for k in range(1, bits):
        word = word | (b[..., k] << (8 * k))
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device, dtype=wide)
    out = ((word.unsqueeze(-1) >> shifts) & mask).to(torch.uint8)
    return out.reshape(*lead, g * 8)[..., :m]


def lookup_width(bits: int) -> int:
    """Index width of :func:`lookup_table`'s table for b-bit codes (0: no table)."""
    return 8 if bits in (1, 2, 4, 8) else 12 if bits == 3 else 0


def lookup_table(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """Table that decodes packed bytes straight to codebook values, and its index width in bits.

    Dequantization is then one gather: for b in {1, 2, 4} each byte indexes a row of 8/b values;
    for b = 3 each 12-bit half of a 3-byte group indexes 4 values. Unpacking and the codebook
    lookup are fused this way, which is what makes decoding memory-bound rather than op-bound.
    Other widths return an empty table (decode via :func:`unpack` then index).
    """
    levels = values.shape[0]
    if bits in (1, 2, 4, 8):
        width = 8
    elif bits == 3:
        width = 12
    else:
        return values.new_empty(0), 0
    per = width // bits
    idx = torch.arange(1 << width, device=values.device)
    codes = (idx.unsqueeze(-1) >> (torch.arange(per, device=values.device) * bits)) & (levels - 1)
    return values[codes], width


def decode_with_table(
    packed: torch.Tensor, table: torch.Tensor, width: int, m: int
) -> torch.Tensor:
    """Packed rows to codebook values (..., m) with a table from :func:`lookup_table`."""
    *lead, nbytes = packed.shape
    bits = width // table.shape[-1]
    if packed.dtype != torch.uint8 or nbytes != packed_row_bytes(m, bits):
        raise SeqkvError(
            f"packed rows are {nbytes} x {packed.dtype}, expected "
            f"{packed_row_bytes(m, bits)} x uint8 for {m} x {bits}-bit codes"
        )
    if width == 8 and table.shape[-1] == 8 and packed.device.type != "cpu":
        # 1-bit on GPUs: an 8-wide row gather is slow there (25 GB/s); shifts and one fused
        # multiply-add reach memory bandwidth. Exact, since the table is affine in the bit.
        lo, step = table[0, 0], table[-1, 0] - table[0, 0]
        bitsv = unpack(packed, 1, nbytes * 8).to(table.dtype)
        return (bitsv * step + lo).reshape(*lead, -1)[..., :m]
    if width == 8:
        # embedding is the fastest row gather on CPU (2x plain indexing) and fine on GPUs.
        out = torch.nn.functional.embedding(packed.long(), table)
    else:  # 3-bit: three bytes hold two 12-bit indices
        b = packed.reshape(*lead, nbytes // 3, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        idx = torch.stack([word & 0xFFF, word >> 12], dim=-1)
        out = torch.nn.functional.embedding(idx.long(), table)
    return out.reshape(*lead, -1)[..., :m]


@functools.lru_cache(maxsize=32)
def _float_pack_matrix(m: int, bits: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    per = 8 // bits if bits in (1, 2, 4) else 8
    j = torch.arange(m)
    mat = torch.zeros(m, m // per, dtype=torch.float64)
    mat[j, j // per] = torch.exp2((j % per) * bits).double()
    return mat.to(device=device, dtype=dtype)


def pack_float_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack` for integer-valued float32 codes (r, m), m a multiple of 8, bits 1..4.

    Packing is linear, so on the CPU it is one small matrix product (each group of codes
    times its powers of two: exact, the words stay below 2^24) plus one narrowing cast,
    instead of a chain of byte-wise shifts over strided views.
    """
    r, m = codes.shape
    word = codes @ _float_pack_matrix(m, bits, str(codes.device), codes.dtype)
    if bits in (1, 2, 4):
        return word.to(torch.uint8)
    # 3 bits: eight codes make a 24-bit word; its three low bytes, little-endian, are the bytes.
    w = word.to(torch.int32)
    if sys.byteorder != "little":
        shifts = torch.tensor([0, 8, 16], dtype=torch.int32, device=w.device)
        return ((w.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(r, -1)
    return w.view(torch.uint8).reshape(r, m // 8, 4)[..., :3].reshape(r, m // 8 * 3)
