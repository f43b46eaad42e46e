"""The compact optimizer-state encodings of csrc/math/ (codes8.h, random.h), in torch.

Bitwise equal to the C++ (the kernels' stochastic rounding and 8-bit codes), without the
compiled module: a reference for tests, and a way to read or write compact state on any
device torch runs on. Each function names the one of those headers it mirrors.

Conventions:
  * 64-bit hashes of per-tensor keys (``mix64``, ``rounding_key``, ``moment_key``) are
    Python ints taken modulo 2^64.
  * Per-element 32-bit values (hashes, random bits, float bits) are int64 tensors holding
    unsigned 32-bit values, in [0, 2^32).
  * An element's index is its position in the tensor's *memory* order
    (``memory_order_flat``), as the kernels walk it, plus the tensor's ``offset`` (where
    it starts in its whole param: a shard's offset, else 0); tensors must be dense and
    non-overlapping (any strides, e.g. transposed).
  * Float arithmetic is float32, one correctly rounded operation at a time, in the C++
    order (separate torch ops never contract a multiply and an add).
"""

from typing import NamedTuple, Tuple

import torch

__all__ = [
    "KCODE_BLOCK", "CodeFormat", "code_format", "num_code_blocks",
    "mix64", "rounding_key", "moment_key",
    "hash32", "rounding_bits", "moment_bits", "moment_random", "round_bf16_stochastic",
    "stochastic_bf16",
    "code_value", "decode_code", "code_scale", "encode_code", "block_absmax",
    "encode_codes", "decode_codes", "memory_order_flat", "is_dense",
]

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF

# kCodeBlock: the elements of one block of 8-bit codes (one float32 scale each).
KCODE_BLOCK = 256


class CodeFormat(NamedTuple):
    """CodeFormat<kSigned>: the largest magnitude code, the exponent bias, the smallest
    normal value and the subnormal step (values in units of the block's scale)."""
    max_code: int
    bias: int
    smallest_normal: float
    subnormal_step: float

    @property
    def offset(self) -> int:
        """kOffset: a normal code c has the float32 bits (c << 20) + offset."""
        return (127 - self.bias) << 23

    @property
    def zero_is_floor(self) -> bool:
        """kZeroIsFloor: code 0 decodes to half the subnormal step, not zero (exp_avg_sq,
        the unsigned format: a floor tied to the block's scale)."""
        return self.max_code == 255


_SIGNED = CodeFormat(127, 15, 2.0 ** -14, 2.0 ** -17)    # exp_avg: sign + e4m3
_UNSIGNED = CodeFormat(255, 31, 2.0 ** -30, 2.0 ** -33)  # exp_avg_sq: e5m3


def code_format(signed: bool) -> CodeFormat:
    """CodeFormat<kSigned>."""
    return _SIGNED if signed else _UNSIGNED


def num_code_blocks(numel: int) -> int:
    """The number of blocks (and scales) of a tensor of ``numel`` elements."""
    return -(-numel // KCODE_BLOCK)


# --------------------------------------------------------------------------------------
# Keys: Python ints modulo 2^64.

def mix64(x: int) -> int:
    """mix64: splitmix64's finalizer."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def rounding_key(seed: int, param: int, step) -> int:
    """rounding_key(seed, param, step): the key of one param at one step. ``seed`` is an
    int64 (negative ones wrap as the C++ cast does), ``param`` a uint32 (the param's id: the
    op's param_ids), ``step`` the step count (int or an integer-valued float, >= 0:
    static_cast<uint64_t> truncates it)."""
    if not 0 <= step < 2.0 ** 64:
        raise ValueError(f"rounding_key: step must be in [0, 2^64), got {step}")
    s = mix64((seed & _M64) + 0x9E3779B97F4A7C15)
    return mix64(mix64(s ^ (param & _M32)) ^ int(step))


def moment_key(key: int) -> int:
    """moment_key(key): the key of the compact moments' rounding (both moments)."""
    return mix64(key + 0x632BE59BD9B4E019)


# --------------------------------------------------------------------------------------
# Per-element random bits: int64 tensors of uint32 values.

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c modulo 2^32 (x in [0, 2^32), c < 2^32), in halves so that no int64 product
    overflows."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """hash32 (Wellons' lowbias32), elementwise on uint32 values held in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rounding_bits(key: int, index: torch.Tensor) -> torch.Tensor:
    """rounding_bits(key, index) (via rounding_bits32), elementwise: the random bits of
    the elements at ``index`` (an int64 tensor of memory-order indices >= 0)."""
    index = index.to(torch.int64)
    key &= _M64
    key_lo, key_hi = key & _M32, key >> 32
    return hash32(hash32((index & _M32) ^ key_lo) ^ (key_hi ^ ((index >> 32) & _M32)))


# --------------------------------------------------------------------------------------
# Float bits.

def _bits(x: torch.Tensor) -> torch.Tensor:
    """The bits of float32 ``x`` as uint32 values in int64 (memcpy to uint32_t)."""
    return x.view(torch.int32).to(torch.int64) & _M32


def _float32(u: torch.Tensor) -> torch.Tensor:
    """The float32 with bits ``u`` (uint32 values in int64)."""
    return (u - ((u >> 31) << 32)).to(torch.int32).view(torch.float32)


def _check_float32(x: torch.Tensor, name: str):
    if x.dtype != torch.float32:
        raise TypeError(f"{name}: expected a float32 tensor, got {x.dtype}")


# --------------------------------------------------------------------------------------
# Memory order.

def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its memory without gaps or overlaps (any order of dims): what
    memory_order_flat needs."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def memory_order_flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``t``'s elements in memory order (the order of the kernels' element
    indices): its dims permuted to strides-descending order, flattened. Writing to it
    writes ``t``. Raises ValueError unless ``t`` is dense and non-overlapping."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    permuted = t.permute(order)
    if not permuted.is_contiguous():
        raise ValueError(f"expected a dense, non-overlapping tensor, got sizes "
                         f"{tuple(t.shape)} and strides {t.stride()}")
    return permuted.view(-1)


def _like(t: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """A new tensor with ``t``'s shape and strides (``flat``'s dtype), holding ``flat``
    (its memory-order elements)."""
    out = torch.empty_like(t, dtype=flat.dtype)
    memory_order_flat(out).copy_(flat)
    return out


# --------------------------------------------------------------------------------------
# Stochastic rounding to bfloat16.

def round_bf16_stochastic(x: torch.Tensor, random: torch.Tensor) -> torch.Tensor:
    """round_bf16_stochastic(x, random), elementwise: float32 ``x`` rounded to bfloat16
    with the low 16 bits of ``random`` (a NaN keeps its sign and top payload, quiet)."""
    _check_float32(x, "round_bf16_stochastic")
    u = _bits(x)
    u = torch.where(torch.isnan(x), u | 0x00400000, (u + (random & 0xFFFF)) & _M32)
    h = u >> 16
    return (h - ((h >> 15) << 16)).to(torch.int16).view(torch.bfloat16)


def moment_bits(key: int, index: torch.Tensor) -> torch.Tensor:
    """moment_bits(key, index), elementwise: one round of hash32 of the index's low half
    xor the folded key (fold_key: the key's low half xor hash32(key's high half xor the
    index's high half))."""
    index = index.to(torch.int64)
    key &= _M64
    folded = (key & _M32) ^ hash32(((key >> 32) ^ ((index >> 32) & _M32)) & _M32)
    return hash32((index & _M32) ^ folded)


def moment_random(bits: torch.Tensor, which: int) -> torch.Tensor:
    """moment_random(bits, which), elementwise: the low (which 0, exp_avg) or high (1,
    exp_avg_sq) 16 bits of ``bits`` in both halves."""
    half = (bits >> 16) if which else (bits & 0xFFFF)
    return (half << 16) | half


def _memory_index(numel: int, offset: int, device) -> torch.Tensor:
    """The indices of ``numel`` elements in memory order, counted from ``offset``."""
    if offset < 0:
        raise ValueError(f"an element offset must be >= 0, got {offset}")
    return torch.arange(offset, offset + numel, dtype=torch.int64, device=device)


def stochastic_bf16(x: torch.Tensor, key: int, which=None, offset: int = 0) -> torch.Tensor:
    """float32 ``x`` rounded stochastically to bfloat16 as the kernels store it, with the
    random bits of each element's index (``offset`` + its memory index): a param's
    (stochastic_rounding, ``which`` None: rounding_bits(key, index)), or moment ``which``
    (0 exp_avg, 1 exp_avg_sq: moment_random(moment_bits(key, index), which), with ``key``
    the moments' key). Same shape and strides as ``x``."""
    _check_float32(x, "stochastic_bf16")
    flat = memory_order_flat(x)
    index = _memory_index(flat.numel(), offset, flat.device)
    random = rounding_bits(key, index) if which is None \
        else moment_random(moment_bits(key, index), which)
    return _like(x, round_bf16_stochastic(flat, random))


# --------------------------------------------------------------------------------------
# 8-bit codes.

def code_value(c: torch.Tensor, signed: bool) -> torch.Tensor:
    """code_value<signed>(c), elementwise: the value of magnitude code c in units of the
    scale (float32, exact): c * subnormal_step below 8 (but code 0 of the unsigned format,
    exp_avg_sq's: half a subnormal step, its floor), else the float32 with bits
    (c << 20) + offset."""
    f = code_format(signed)
    c = c.to(torch.int64)
    halves = ((c & 7) << 1) | ((c == 0).to(torch.int64) if f.zero_is_floor else 0)
    subnormal = halves.to(torch.float32) * (f.subnormal_step * 0.5)
    return torch.where(c < 8, subnormal, _float32((c << 20) + f.offset))


def decode_code(code: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    """decode_code<signed>(code, scale), elementwise (``scale`` broadcasts)."""
    code = code.to(torch.int64)
    value = code_value(code & 0x7F if signed else code, signed)
    if signed:  # the sign first, then the scale, as the C++
        value = torch.where((code & 0x80) != 0, -value, value)
    value = value * scale
    if code_format(signed).zero_is_floor:
        # the floor of a non-finite block (scale inf) is NaN, as a zero was: + 0 * scale
        scale = torch.as_tensor(scale, dtype=torch.float32)
        value = torch.where(code == 0, value + 0.0 * scale, value)
    return value


def code_scale(absmax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """code_scale(absmax), elementwise: (scale, inv) of blocks of largest magnitude
    ``absmax`` (float32): the smallest power of two 2^k (k in [-126, 126]) with absmax <=
    1.875 * 2^k, and its inverse; (0, 0) for zero; (absmax, 0) for NaN or infinity."""
    _check_float32(absmax, "code_scale")
    b = _bits(absmax)
    k = (b >> 23) - 127 + ((b & 0x7FFFFF) > 0x700000).to(torch.int64)
    k = k.clamp(-126, 126)
    scale = _float32((k + 127) << 23)
    inv = _float32((127 - k) << 23)
    finite = absmax <= 3.402823466e38
    zero = absmax == 0
    scale = torch.where(finite, torch.where(zero, torch.zeros_like(scale), scale), absmax)
    inv = torch.where(finite & ~zero, inv, torch.zeros_like(inv))
    return scale, inv


def encode_code(x: torch.Tensor, inv: torch.Tensor, random: torch.Tensor,
                signed: bool) -> torch.Tensor:
    """encode_code<signed>(x, inv, random), elementwise (``inv`` and ``random``, uint32
    values in int64, broadcast): uint8 codes."""
    _check_float32(x, "encode_code")
    f = code_format(signed)
    magnitude = (x.abs() if signed else x) * inv
    small = magnitude < f.smallest_normal
    a = torch.where(small, magnitude + f.smallest_normal, magnitude)
    u = (((_bits(a) + (random >> 12)) & _M32) >> 20) - (f.offset >> 20) - small.to(torch.int64) * 8
    code = (u & _M32).clamp(max=f.max_code)
    if signed:
        code = code | ((_bits(x) >> 24) & 0x80)
    return code.to(torch.uint8)


def block_absmax(x: torch.Tensor) -> torch.Tensor:
    """The absmax_of reduction of each block of ``x`` (float32, blocks in memory order):
    the largest magnitude, NaN if the block holds a NaN. 1-D, num_code_blocks(numel)."""
    _check_float32(x, "block_absmax")
    return _blocks(memory_order_flat(x)).abs().amax(dim=1)


def _blocks(flat: torch.Tensor) -> torch.Tensor:
    """``flat`` padded with zeros to whole blocks, as (blocks, KCODE_BLOCK)."""
    n = flat.numel()
    padded = flat.new_zeros(num_code_blocks(n) * KCODE_BLOCK)
    padded[:n] = flat
    return padded.view(-1, KCODE_BLOCK)


def encode_codes(x: torch.Tensor, signed: bool, key: int,
                 offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 ``x`` stored as 8-bit codes, as the kernels store a Codes8 moment: per block
    (KCODE_BLOCK elements in memory order, the last maybe shorter) the scale of its absmax
    (code_scale), per element encode_code with moment_random(moment_bits(key, its index:
    ``offset`` + its memory index), 0 for exp_avg (``signed``), 1 for exp_avg_sq), ``key``
    the moments' key.
    Returns (codes: uint8 with ``x``'s shape and strides, scales: float32 1-D of
    num_code_blocks(x.numel()))."""
    _check_float32(x, "encode_codes")
    blocks = _blocks(memory_order_flat(x))
    scale, inv = code_scale(blocks.abs().amax(dim=1))
    index = _memory_index(blocks.numel(), offset, x.device)
    random = moment_random(moment_bits(key, index), 0 if signed else 1).view_as(blocks)
    codes = encode_code(blocks, inv[:, None], random, signed).view(-1)[:x.numel()]
    return _like(x, codes), scale


def decode_codes(codes: torch.Tensor, scales: torch.Tensor, signed: bool) -> torch.Tensor:
    """The float32 values of uint8 ``codes`` with their block ``scales`` (decode_code per
    element): a tensor with ``codes``' shape and strides."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"decode_codes: expected uint8 codes, got {codes.dtype}")
    _check_float32(scales, "decode_codes")
    flat = memory_order_flat(codes)
    if scales.shape != (num_code_blocks(flat.numel()),):
        raise ValueError(f"decode_codes: {flat.numel()} codes need "
                         f"{num_code_blocks(flat.numel())} scales, got {tuple(scales.shape)}")
    values = decode_code(_blocks(flat), scales[:, None], signed)
    return _like(codes, values.view(-1)[:flat.numel()])
