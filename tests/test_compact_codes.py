"""adamx._compact: the compact state encodings of csrc/math/ (codes8.h, random.h) in torch.

Pure Python (no compiled module). The vectorized functions are checked against a scalar
transliteration of the C++ written here with Python ints and floats (float32 rounding by
struct: a double result of one float32 +, * or / rounded to float32 is the correctly
rounded float32 result, double rounding being innocuous for 53 >= 2 * 24 + 2 bits), and
against the properties the encodings promise: the 8-bit codes' float format (3 mantissa
bits, subnormals, largest value 1.875) with power-of-two block scales, unbiased stochastic
rounding, exact values on the grid and a grid that a doubled scale does not move, NaN
blocks, memory order.
"""

import math
import struct

import pytest
import torch

from adamx import _compact as C

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
FLT_MAX = 3.4028234663852886e38
SIGNED = [True, False]


# --------------------------------------------------------------------------------------
# A scalar transliteration of csrc/math/codes8.h and random.h.

def f32(v: float) -> float:
    """v rounded to float32."""
    try:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def from_bits(u: int) -> float:
    return struct.unpack("<f", struct.pack("<I", u & M32))[0]


def mix64_ref(x):
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)


def rounding_key_ref(seed, tensor, step):
    s = mix64_ref((seed % 2**64 + 0x9E3779B97F4A7C15) % 2**64)
    return mix64_ref(mix64_ref(s ^ tensor) ^ int(step))


def moment_key_ref(key):
    return mix64_ref((key + 0x632BE59BD9B4E019) % 2**64)


def hash32_ref(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2**32
    return x ^ (x >> 16)


def rounding_bits_ref(key, index):
    key_lo, key_hi = key % 2**32, key >> 32
    return hash32_ref(hash32_ref((index % 2**32) ^ key_lo) ^ (key_hi ^ (index >> 32)))


def fold_key_ref(key, index_hi):
    return (key % 2**32) ^ hash32_ref((key >> 32) ^ index_hi)


def moment_bits_ref(key, index):
    """One round of hash32 (rounding_bits has two), the high halves folded into the key."""
    return hash32_ref((index % 2**32) ^ fold_key_ref(key, index >> 32))


def moment_random_ref(bits, which):
    half = bits >> 16 if which else bits & 0xFFFF
    return half | (half << 16)


def round_bf16_ref(x_bits, random):
    x = from_bits(x_bits)
    u = x_bits | 0x00400000 if x != x else (x_bits + (random & 0xFFFF)) % 2**32
    return u >> 16


# The 8-bit code formats, written down independently of C.code_format: (max_code, bias).
# Values 2^((c >> 3) - bias) * (1 + (c & 7) / 8) for normal codes c >= 8, c * step below,
# but for the unsigned format's (exp_avg_sq's) code 0: step / 2, its floor (no zero).
FORMATS = {True: (127, 15), False: (255, 31)}


def fmt_ref(signed):
    """(max_code, bias, offset, smallest_normal, subnormal_step) of CodeFormat<signed>."""
    max_code, bias = FORMATS[signed]
    return max_code, bias, (127 - bias) << 23, 2.0 ** (1 - bias), 2.0 ** (-2 - bias)


def code_value_ref(c, signed):
    _, _, offset, _, step = fmt_ref(signed)
    if c == 0 and not signed:
        return step / 2
    return f32((c & 7) * step) if c < 8 else from_bits((c << 20) + offset)


def code_value_def(c, signed):
    """The value of code c by the format's definition (exact in double)."""
    _, bias, _, _, step = fmt_ref(signed)
    if c == 0 and not signed:
        return step / 2  # the floor: code 0 stands for [0, step)
    return c * step if c < 8 else 2.0 ** ((c >> 3) - bias) * (1 + (c & 7) / 8)


def code_scale_ref(absmax):
    if not absmax <= FLT_MAX:  # NaN, inf
        return absmax, 0.0
    if absmax == 0:
        return 0.0, 0.0
    b = bits(absmax)
    k = (b >> 23) - 127 + (1 if (b & 0x7FFFFF) > 0x700000 else 0)
    k = max(-126, min(126, k))
    return from_bits((k + 127) << 23), from_bits((127 - k) << 23)


def code_scale_def(absmax):
    """The scale by its definition: the smallest 2^k, k in [-126, 126], with absmax <=
    1.875 * 2^k (126 if there is none)."""
    k = -126
    while k < 126 and absmax > 1.875 * 2.0**k:
        k += 1
    return 2.0**k


def encode_ref(x, x_bits, inv, random, signed):
    max_code, _, offset, smallest_normal, _ = fmt_ref(signed)
    magnitude = f32((abs(x) if signed else x) * inv)
    small = magnitude < smallest_normal
    a = f32(magnitude + smallest_normal) if small else magnitude
    u = (((bits(a) + (random >> 12)) % 2**32) >> 20) - (offset >> 20) - (8 if small else 0)
    c = min(u % 2**32, max_code)
    return c | ((x_bits >> 24) & 0x80) if signed else c


def decode_ref(code, scale, signed):
    m = f32(code_value_ref(code & 0x7F if signed else code, signed) * scale)
    if not signed and code == 0:
        m = f32(m + 0.0 * scale)  # the floor of a block of scale inf: NaN
    return -m if signed and code & 0x80 else m


def float_bits(x: torch.Tensor) -> list:
    return (x.view(torch.int32).to(torch.int64) & M32).tolist()


def pow2(k: torch.Tensor) -> torch.Tensor:
    """2^k as float32 (k an int64 tensor of normal exponents), exactly."""
    return ((k + 127) << 23).to(torch.int32).view(torch.float32)


def nextafter(x: torch.Tensor, direction: float) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, direction))


def gap_bound(x: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    """A bound on the gap between the two codes' values around x in a block of `scale`:
    2^(e - 3) <= |x| / 8 in a binade [2^e, 2^(e+1)) of normal values, the subnormal step
    below."""
    step = C.code_format(signed).subnormal_step
    return torch.maximum(x.abs().double() / 8, scale.double() * step)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal float32 tensors, any NaN equal to any NaN."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | both_nan).all())


def uint32s(n, gen):
    return torch.randint(0, 2**32, (n,), dtype=torch.int64, generator=gen)


def wide_values(n, gen, lo=-20, hi=20):
    """Random float32 of both signs over many binades."""
    mant = torch.rand(n, generator=gen) + 0.5
    exp = torch.randint(lo, hi, (n,), generator=gen).float()
    sign = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    return (sign * mant * torch.exp2(exp)).float()


# --------------------------------------------------------------------------------------
# Keys and random bits.

def test_mix64_is_splitmix64():
    # splitmix64 from seed 0: its outputs are mix64 of multiples of the golden gamma.
    gamma = 0x9E3779B97F4A7C15
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [C.mix64(k * gamma % 2**64) for k in (1, 2, 3)] == expected
    assert C.mix64(0) == 0
    for x in [1, 2**63, M64, 0x123456789ABCDEF0, 2**32 - 1]:
        assert C.mix64(x) == mix64_ref(x)


@pytest.mark.parametrize("seed", [0, 1, -1, 2**63 - 1, -(2**63), 123456789])
def test_rounding_and_moment_keys(seed):
    for tensor, step in [(0, 0), (1, 1), (7, 1000), (2**32 - 1, 2**40)]:
        key = C.rounding_key(seed, tensor, step)
        assert key == rounding_key_ref(seed, tensor, step)
        assert C.rounding_key(seed, tensor, float(step)) == key  # a double step count
        assert 0 <= key < 2**64
        assert C.moment_key(key) == moment_key_ref(key)
        assert 0 <= C.moment_key(key) < 2**64 and C.moment_key(key) != key
    for key in [0, 1, 2**63, M64, M64 - 0x632BE59BD9B4E019 + 1]:  # the sum wraps
        assert C.moment_key(key) == moment_key_ref(key)
    assert C.moment_key(M64 - 0x632BE59BD9B4E019 + 1) == 0  # mix64(0)
    with pytest.raises(TypeError):  # one key for both moments: no `which` any more
        C.moment_key(5, 0)
    assert C.rounding_key(seed, 0, 1) != C.rounding_key(seed, 0, 2)
    assert C.rounding_key(seed, 0, 1) != C.rounding_key(seed, 1, 1)


def test_hash32_matches_scalar():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([0, 1, 2**31 - 1, 2**31, M32]), uint32s(500, gen)])
    got = C.hash32(x)
    assert got.dtype == torch.int64
    assert got.tolist() == [hash32_ref(v) for v in x.tolist()]


def test_rounding_bits_matches_scalar():
    index = torch.cat([torch.arange(300), torch.tensor([2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3])])
    for key in [0, M64, 0x0123456789ABCDEF, C.rounding_key(3, 4, 5)]:
        got = C.rounding_bits(key, index)
        assert got.tolist() == [rounding_bits_ref(key, i) for i in index.tolist()]
        assert int(got.min()) >= 0 and int(got.max()) <= M32
    # spread: the bits of consecutive indices look uniform
    r = C.rounding_bits(7, torch.arange(1 << 14)).double() / 2**32
    assert abs(r.mean().item() - 0.5) < 0.01


# Indices about the 2^32 boundaries (their high halves fold into the key), and keys with
# high bits set (in the fold) or not.
BIG_INDICES = [2**32 - 2, 2**32 - 1, 2**32, 2**32 + 1, 2**32 + 5, 3 * 2**32 + 7, 2**40 + 3,
               2**63 - 1]
MOMENT_KEYS = [0, 1, 2**32 - 1, 2**32, 0xFFFFFFFF00000000, M64, 0x0123456789ABCDEF,
               C.moment_key(C.rounding_key(3, 4, 5))]


def test_moment_bits_matches_scalar():
    gen = torch.Generator().manual_seed(1)
    index = torch.cat([torch.arange(300), torch.tensor(BIG_INDICES),
                       torch.randint(0, 2**62, (100,), dtype=torch.int64, generator=gen)])
    for key in MOMENT_KEYS:
        got = C.moment_bits(key, index)
        assert got.dtype == torch.int64
        assert got.tolist() == [moment_bits_ref(key, i) for i in index.tolist()]
        assert int(got.min()) >= 0 and int(got.max()) <= M32
        # a stream of its own: not the param's bits of the same key and index
        assert (got != C.rounding_bits(key, index)).float().mean() > 0.99
    # one round of hash32: with key 0 and index < 2^32 (fold_key(0, 0) = hash32(0) = 0),
    # the bits are hash32(index)
    assert torch.equal(C.moment_bits(0, torch.arange(1000)), C.hash32(torch.arange(1000)))
    # the key's high half and the index's high half are folded together: equal halves
    # cancel (fold_key(key, hi) = lo32(key) ^ hash32(hi32(key) ^ hi))
    lo, hi = 0x9ABCDEF0, 0x12345678
    i = torch.arange(50)
    assert torch.equal(C.moment_bits(hi << 32 | lo, i + (hi << 32)), C.moment_bits(lo, i))
    assert not torch.equal(C.moment_bits(hi << 32 | lo, i), C.moment_bits(lo, i))
    # an index's high half changes the bits of its low half
    assert (C.moment_bits(7, i + 2**32) != C.moment_bits(7, i)).all()
    # int32 indices work as the int64 ones
    assert torch.equal(C.moment_bits(7, torch.arange(200, dtype=torch.int32)),
                       C.moment_bits(7, torch.arange(200)))
    # spread: the bits of consecutive indices look uniform, both halves
    r = C.moment_bits(C.moment_key(7), torch.arange(1 << 14))
    for half in [r & 0xFFFF, r >> 16]:
        assert abs(half.double().mean().item() / 2**16 - 0.5) < 0.01


def test_moment_random_matches_scalar():
    gen = torch.Generator().manual_seed(2)
    b = torch.cat([torch.tensor([0, 1, 0xFFFF, 0x10000, 0x12345678, 0x80000000, M32]),
                   uint32s(500, gen)])
    for which in (0, 1):
        got = C.moment_random(b, which)
        assert got.dtype == torch.int64
        assert got.tolist() == [moment_random_ref(v, which) for v in b.tolist()]
        assert int(got.min()) >= 0 and int(got.max()) <= M32
        assert torch.equal(got >> 16, got & 0xFFFF)  # the half in both halves
    # which 0 (exp_avg): the low half; 1 (exp_avg_sq): the high half
    assert C.moment_random(torch.tensor(0x12345678), 0).item() == 0x56785678
    assert C.moment_random(torch.tensor(0x12345678), 1).item() == 0x12341234
    assert C.moment_random(torch.tensor(M32), 0).item() == M32
    assert C.moment_random(torch.tensor(0xFFFF0000), 0).item() == 0
    assert C.moment_random(torch.tensor(0xFFFF0000), 1).item() == M32
    # the two roundings read it where they read: bfloat16 the low 16 bits, the codes the
    # top 20 (random >> 12), whose top 16 are the half
    assert torch.equal(C.moment_random(b, 0) & 0xFFFF, b & 0xFFFF)
    assert torch.equal(C.moment_random(b, 1) & 0xFFFF, b >> 16)
    assert torch.equal(C.moment_random(b, 0) >> 16, b & 0xFFFF)
    assert torch.equal(C.moment_random(b, 1) >> 16, b >> 16)


def test_moment_streams_of_one_hash_differ():
    """exp_avg and exp_avg_sq read the two halves of one hash: their rounding decisions
    differ, and look independent (x halfway between two bfloat16 values: each rounds up
    half the time, and the two agree half the time)."""
    n = 1 << 14
    x = torch.full((n,), 1.0 + 2.0**-8)  # halfway between 1 and 1 + 2^-7
    up = 1.0 + 2.0**-7
    key = C.moment_key(C.rounding_key(1, 2, 3))
    up0 = C.stochastic_bf16(x, key, which=0).float() == up
    up1 = C.stochastic_bf16(x, key, which=1).float() == up
    up_param = C.stochastic_bf16(x, key).float() == up
    for u in [up0, up1, up_param]:
        assert abs(u.double().mean().item() - 0.5) < 0.02
    for a, b in [(up0, up1), (up0, up_param), (up1, up_param)]:
        assert abs((a == b).double().mean().item() - 0.5) < 0.02
    # the codes, likewise: one key for both, different roundings
    y = torch.full((n,), 1.0 + 1.0 / 16)  # halfway between codes of 1 and 1.125
    y[::256] = 1.875  # each block's absmax: scale 1
    m_codes, _ = C.encode_codes(y, True, key)
    v_codes, _ = C.encode_codes(y, False, key)
    m_up = (m_codes.long() == 121)[y != 1.875]  # 120: 1.0, 121: 1.125 (signed)
    v_up = (v_codes.long() == 249)[y != 1.875]  # 248: 1.0, 249: 1.125 (unsigned)
    for u in [m_up, v_up]:
        assert abs(u.double().mean().item() - 0.5) < 0.02
    assert abs((m_up == v_up).double().mean().item() - 0.5) < 0.02


# --------------------------------------------------------------------------------------
# Stochastic rounding to bfloat16.

def test_round_bf16_matches_scalar():
    gen = torch.Generator().manual_seed(2)
    x = wide_values(400, gen, -130, 128)  # includes subnormals, overflow to inf
    specials = [0.0, -0.0, math.inf, -math.inf, 3.3895313892515355e38]
    x = torch.cat([x, torch.tensor(specials)])
    nan_bits = torch.tensor([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FBFFFFF])
    x = torch.cat([x, nan_bits.to(torch.int32).view(torch.float32)])
    random = uint32s(x.numel(), gen)
    got = C.round_bf16_stochastic(x, random).view(torch.int16).to(torch.int64) & 0xFFFF
    x_bits = (x.view(torch.int32).to(torch.int64) & M32).tolist()
    assert got.tolist() == [round_bf16_ref(u, r) for u, r in zip(x_bits, random.tolist())]


def test_stochastic_bf16_exact_values_and_nan():
    gen = torch.Generator().manual_seed(3)
    exact = wide_values(1000, gen).bfloat16()
    exact[:3] = torch.tensor([0.0, -0.0, math.inf])
    for key in range(5):
        out = C.stochastic_bf16(exact.float(), key)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out.view(torch.int16), exact.view(torch.int16))
    x = torch.tensor([1.0, float("nan"), -float("nan"), 2.0])
    out = C.stochastic_bf16(x, 11)
    assert torch.isnan(out[1]) and torch.isnan(out[2])
    assert out[2].view(torch.int16) < 0 <= out[1].view(torch.int16)  # the sign is kept


def test_stochastic_bf16_random_bits():
    """which None: the param's bits (rounding_bits); which 0 / 1: the moments'
    (moment_random(moment_bits(key, index), which)), index the memory index."""
    gen = torch.Generator().manual_seed(16)
    x = wide_values(600, gen)
    x_bits = float_bits(x)
    index = torch.arange(600)
    for key in [0, M64, 0x0123456789ABCDEF, C.moment_key(C.rounding_key(3, 4, 5))]:
        streams = {
            None: [rounding_bits_ref(key, i) for i in range(600)],
            0: [moment_random_ref(moment_bits_ref(key, i), 0) for i in range(600)],
            1: [moment_random_ref(moment_bits_ref(key, i), 1) for i in range(600)],
        }
        outs = {}
        for which, random in streams.items():
            out = C.stochastic_bf16(x, key, which) if which is not None \
                else C.stochastic_bf16(x, key)
            assert out.dtype == torch.bfloat16
            got = (out.view(torch.int16).to(torch.int64) & 0xFFFF).tolist()
            assert got == [round_bf16_ref(u, r) for u, r in zip(x_bits, random)]
            outs[which] = out.view(torch.int16)
        assert torch.equal(outs[None], C.stochastic_bf16(x, key, which=None).view(torch.int16))
        assert torch.equal(outs[0], C.round_bf16_stochastic(
            x, C.moment_random(C.moment_bits(key, index), 0)).view(torch.int16))
        assert torch.equal(outs[1], C.round_bf16_stochastic(
            x, C.moment_random(C.moment_bits(key, index), 1)).view(torch.int16))
        # three streams: each rounds some elements its own way
        assert not torch.equal(outs[None], outs[0]) and not torch.equal(outs[None], outs[1])
        assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("which", [None, 0, 1])
def test_stochastic_bf16_unbiased(which):
    gen = torch.Generator().manual_seed(4)
    x = wide_values(256, gen)
    n = 2000
    total = torch.zeros_like(x, dtype=torch.float64)
    for k in range(n):
        key = C.rounding_key(9, 0, k)
        if which is None:
            total += C.stochastic_bf16(x, key).double()
        else:
            total += C.stochastic_bf16(x, C.moment_key(key), which).double()
    mean = total / n
    # one draw: within one bfloat16 gap of x, standard deviation <= gap / 2
    gap = x.abs().double() * 2.0**-7
    assert ((mean - x.double()).abs() <= 5 * gap / 2 / math.sqrt(n)).all()
    # and it is no rounding to nearest (mean error ~ gap / 4 there)
    assert ((mean - x.double()).abs() / gap).mean() < 0.05



# --------------------------------------------------------------------------------------
# 8-bit codes: the format.

@pytest.mark.parametrize("signed", SIGNED)
def test_code_format(signed):
    max_code, bias, offset, smallest_normal, step = fmt_ref(signed)
    fmt = C.code_format(signed)
    assert isinstance(fmt, C.CodeFormat)
    assert (fmt.max_code, fmt.bias, fmt.smallest_normal, fmt.subnormal_step) == (
        max_code, bias, smallest_normal, step)
    assert fmt.offset == offset == (0x38000000 if signed else 0x30000000)
    assert fmt.zero_is_floor == (not signed)
    assert code_value_def(max_code, signed) == 1.875
    assert code_value_def(8, signed) == smallest_normal == 8 * step


def test_code_value_known_values():
    cases = {True: {0: 0.0, 1: 2.0**-17, 7: 7 * 2.0**-17, 8: 2.0**-14, 9: 1.125 * 2.0**-14,
                    119: 0.9375, 120: 1.0, 121: 1.125, 127: 1.875},
             False: {0: 2.0**-34, 1: 2.0**-33, 7: 7 * 2.0**-33, 8: 2.0**-30, 9: 1.125 * 2.0**-30,
                     247: 0.9375, 248: 1.0, 249: 1.125, 255: 1.875}}
    for signed, values in cases.items():
        got = C.code_value(torch.tensor(list(values)), signed)
        assert got.dtype == torch.float32
        assert got.tolist() == list(values.values())


@pytest.mark.parametrize("signed", SIGNED)
def test_code_value_matches_scalar_and_definition(signed):
    max_code = fmt_ref(signed)[0]
    # all 256 inputs (the C++ takes any uint32; the kernels give it c & 0x7f when signed)
    got = C.code_value(torch.arange(256), signed)
    assert got.tolist() == [code_value_ref(c, signed) for c in range(256)]
    assert got[: max_code + 1].tolist() == [code_value_def(c, signed) for c in range(max_code + 1)]
    assert (got[: max_code + 1].diff() > 0).all()
    # uint8 codes work as inputs too
    assert torch.equal(C.code_value(torch.arange(256, dtype=torch.uint8), signed), got)


@pytest.mark.parametrize("signed", SIGNED)
def test_decode_code_matches_scalar(signed):
    gen = torch.Generator().manual_seed(5 + signed)
    scales = torch.cat([pow2(torch.tensor([-126, -125, -60, -1, 0, 1, 60, 125, 126])),
                        wide_values(6, gen, -130, 128).abs(),
                        torch.tensor([0.0, -0.0, FLT_MAX, math.inf, math.nan])])
    codes = torch.arange(256, dtype=torch.uint8).repeat(scales.numel())
    scales = scales.repeat_interleave(256)
    decoded = C.decode_code(codes, scales, signed)
    assert decoded.dtype == torch.float32
    ref = [decode_ref(c, s, signed) for c, s in zip(codes.tolist(), scales.tolist())]
    assert same_bits(decoded, torch.tensor(ref))
    # scale broadcasts
    one = C.decode_code(codes[:256], torch.tensor(0.25), signed)
    assert same_bits(one, torch.tensor([decode_ref(c, 0.25, signed) for c in range(256)]))


def test_code_scale_matches_scalar_and_definition():
    gen = torch.Generator().manual_seed(5)
    # boundaries: 2^k, 1.875 * 2^k and their float32 neighbours; the k clamps: absmax below
    # 1.875 * 2^-127 (subnormal ones included) and above 1.875 * 2^126
    k = torch.tensor([-126, -125, -30, -15, -14, -1, 0, 1, 20, 125, 126])
    edges = torch.cat([pow2(k), pow2(k) * 1.875, pow2(k - 1) * 1.875, pow2(k) * 1.5])
    edges = torch.cat([edges, nextafter(edges, math.inf), nextafter(edges, 0.0)])
    absmax = torch.cat([
        wide_values(400, gen, -149, 128).abs(),  # subnormal to huge
        edges,
        torch.tensor([1e-45, 1e-40, 5e-39, 1.1e-38, 1.17549435e-38, 1.0, 1.875, 1.9,
                      2.0**127, 3e38, FLT_MAX, 0.0, -0.0, math.inf, math.nan]),
    ])
    scale, inv = C.code_scale(absmax)
    assert scale.dtype == inv.dtype == torch.float32
    ref = [code_scale_ref(a) for a in absmax.tolist()]
    assert same_bits(scale, torch.tensor([s for s, _ in ref]))
    assert same_bits(inv, torch.tensor([i for _, i in ref]))
    # the definition; powers of two whose product with inv is exactly one
    finite = (absmax > 0) & (absmax <= FLT_MAX)
    s, i, a = scale[finite], inv[finite], absmax[finite]
    assert s.tolist() == [code_scale_def(v) for v in a.tolist()]
    assert ((s * i) == 1).all()
    assert (s.view(torch.int32) & 0x7FFFFF == 0).all()
    assert (i.view(torch.int32) & 0x7FFFFF == 0).all()
    unclamped = (s > 2.0**-126) & (s < 2.0**126)
    assert (a[s < 2.0**126].double() <= 1.875 * s[s < 2.0**126].double()).all()
    assert (a[unclamped].double() > 0.9375 * s[unclamped].double()).all()
    # the clamps, and the specials
    assert C.code_scale(torch.tensor([1e-45, 1e-40, 1.1e-38]))[0].tolist() == [2.0**-126] * 3
    assert C.code_scale(torch.tensor([1e-45]))[1].item() == 2.0**126
    assert C.code_scale(torch.tensor([3e38, FLT_MAX]))[0].tolist() == [2.0**126] * 2
    assert C.code_scale(torch.tensor([3e38]))[1].item() == 2.0**-126
    s, i = C.code_scale(torch.tensor([0.0, -0.0, math.inf, math.nan]))
    assert s[:3].tolist() == [0.0, 0.0, math.inf] and math.isnan(s[3].item())
    assert (i == 0).all() and not torch.signbit(s[1])
    assert C.code_scale(torch.tensor([1.875, 1.8750001, 0.9375, 0.93750006]))[0].tolist() == [
        1.0, 2.0, 0.5, 1.0]


def encode_inputs(signed, gen):
    """x, inv and random bits for encode_code: magnitudes (in units of the scale) on the
    grid and next to it, exactly the smallest normal and next to it, the subnormal range,
    beyond the largest code, with scales 2^k over the whole range (the clamps included),
    some arbitrary invs, and the specials; random bits uniform, all ones, and with
    random >> 12 == 0."""
    max_code, _, _, smallest_normal, _ = fmt_ref(signed)
    grid = C.code_value(torch.arange(max_code + 1), signed)
    sn = torch.tensor([smallest_normal])
    m = torch.cat([grid, nextafter(grid, math.inf), nextafter(grid[1:], 0.0),
                   sn, nextafter(sn, 0.0), nextafter(sn, 1.0), sn * 0.5, sn / 16,
                   torch.rand(200, generator=gen) * smallest_normal,  # subnormal range
                   torch.rand(200, generator=gen) * smallest_normal / 2**12,  # below it
                   torch.rand(300, generator=gen) * 1.875,
                   torch.tensor([1.9, 2.0, 3.99, 2.0**-149, 2.0**-140])])
    n = m.numel()
    k = torch.tensor([-126, -120, -40, -1, 0, 1, 40, 126])[
        torch.randint(0, 8, (n,), generator=gen)]
    x = m * pow2(k)  # in float32: it underflows for some tiny ones with k = -126
    inv = pow2(-k)
    if signed:
        x = torch.where(torch.rand(n, generator=gen) < 0.5, -x, x)
    # arbitrary invs (the function does not need a power of two)
    arbitrary = torch.rand(n, generator=gen) < 0.1
    inv = torch.where(arbitrary, wide_values(n, gen).abs(), inv)
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45, FLT_MAX, 1.0, 1.0,
                1.0, -1.0, -1e-30]
    special_inv = [1.0, 1.0, 1.0, 1.0, 1.0, 2.0**126, 2.0**126, 2.0**-126, 0.0, math.inf,
                   math.nan, 1.0, 1.0]
    nans = torch.tensor([0x7FC00000, 0xFFC00000, 0x7F800001]).to(torch.int32).view(torch.float32)
    x = torch.cat([x, torch.tensor(specials), nans])
    inv = torch.cat([inv, torch.tensor(special_inv), torch.ones(3)])
    n = x.numel()
    random = uint32s(n, gen)
    random[torch.rand(n, generator=gen) < 0.1] = M32
    random[torch.rand(n, generator=gen) < 0.1] = 0xFFF
    return x, inv, random


@pytest.mark.parametrize("signed", SIGNED)
def test_encode_code_matches_scalar(signed):
    gen = torch.Generator().manual_seed(6 + signed)
    x, inv, random = encode_inputs(signed, gen)
    if not signed:  # the C++ takes negative x too (mirrored, not meaningful)
        x = torch.where(torch.rand(x.numel(), generator=gen) < 0.95, x.abs(), x)
    x_list, x_bits, inv_list = x.tolist(), float_bits(x), inv.tolist()
    # random bits that take a (the float32 whose bits are rounded) exactly to the next
    # code boundary, or one short of it: a one-ulp error in a (from an fma, or a double
    # rounding) changes those codes
    smallest_normal = fmt_ref(signed)[3]
    for i in range(0, x.numel(), 2):
        mag = f32((abs(x_list[i]) if signed else x_list[i]) * inv_list[i])
        a = f32(mag + smallest_normal) if mag < smallest_normal else mag
        low = bits(a) & 0xFFFFF
        random[i] = (((1 << 20) - low - (i // 2 % 2)) & 0xFFFFF) << 12 | (i & 0xFFF)
    codes = C.encode_code(x, inv, random, signed)
    assert codes.dtype == torch.uint8
    expected = [encode_ref(*args, signed)
                for args in zip(x_list, x_bits, inv_list, random.tolist())]
    assert codes.tolist() == expected
    # inv and random broadcast
    one = C.encode_code(x, torch.tensor(1.0), torch.tensor(12345 << 12), signed)
    assert one.tolist() == [encode_ref(v, b, 1.0, 12345 << 12, signed)
                            for v, b in zip(x_list, x_bits)]


@pytest.mark.parametrize("signed", SIGNED)
def test_encode_code_specials(signed):
    max_code, _, _, smallest_normal, step = fmt_ref(signed)
    sign = 0x80 if signed else 0
    for r in [0, 0xFFF, 1 << 12, 0x80000000, M32]:
        random = torch.tensor(r)
        enc = lambda v, inv=1.0: C.encode_code(torch.tensor(v), torch.tensor(inv), random,
                                               signed).item()
        assert enc(0.0) == 0 and enc(0.0, 0.0) == 0 and enc(1.0, 0.0) == 0  # zero block
        assert enc(-0.0) == sign  # -0.0: the sign bit only
        assert enc(smallest_normal) == 8 and enc(1.875) == max_code and enc(1.0) == max_code - 7
        assert enc(3.0) == max_code and enc(FLT_MAX) == max_code  # beyond the largest code
        assert enc(math.inf) == max_code and enc(math.nan) == max_code
        assert enc(math.inf, 0.0) == max_code and enc(math.nan, 0.0) == max_code
        if signed:
            assert enc(-math.inf) == 0x80 | max_code and enc(-1.0) == 0x80 | (max_code - 7)
        assert enc(step) == 1 and enc(7 * step) == 7
    # half a subnormal step: 0 or 1, by the random bits' top 20
    half = lambda r: C.encode_code(torch.tensor(step / 2), torch.tensor(1.0),
                                   torch.tensor(r), signed).item()
    assert half(0x7FFFF << 12) == 0 and half(0x80000 << 12) == 1 and half(M32) == 1


# --------------------------------------------------------------------------------------
# 8-bit codes: the grid.

@pytest.mark.parametrize("signed", SIGNED)
def test_values_on_the_grid_are_exact(signed):
    """A value on the grid (code_value(c) * scale) encodes to c for any random bits, and
    whole tensors of them decode to themselves; but for exp_avg_sq's code 0, the floor,
    which stands for [0, step): a zero encodes to it, and it encodes to 0 or 1."""
    max_code, step = fmt_ref(signed)[0], fmt_ref(signed)[4]
    first = 0 if signed else 1
    grid = C.code_value(torch.arange(first, max_code + 1), signed)
    gen = torch.Generator().manual_seed(10)
    random = torch.cat([torch.tensor([0, 0xFFF, 1 << 12, 0xFFFFF000, M32]), uint32s(20, gen)])
    ks = [-126, -20, 0, 40, 126] if signed else [-116, -20, 0, 40, 126]  # values exact
    for k in ks:
        x = grid * 2.0**k
        assert (x / 2.0**k == grid).all()
        for r in random.tolist():
            codes = C.encode_code(x, torch.tensor(2.0**-k), torch.tensor(r), signed).long()
            assert torch.equal(codes, torch.arange(first, max_code + 1))
            if signed:
                codes = C.encode_code(-x, torch.tensor(2.0**-k), torch.tensor(r), signed).long()
                assert torch.equal(codes, torch.arange(max_code + 1) | 0x80)
            elif k > -116:  # (2^-116 * step / 2 underflows float32)
                inv = torch.tensor(2.0**-k)
                assert C.encode_code(torch.tensor(0.0), inv, torch.tensor(r), False) == 0
                floor = C.encode_code(torch.tensor(step / 2 * 2.0**k), inv, torch.tensor(r),
                                      False)
                assert floor.item() == (1 if r >> 12 >= 1 << 19 else 0)
                assert C.decode_code(torch.tensor(0), torch.tensor(2.0**k), False) == \
                    step / 2 * 2.0**k
        t = torch.cat([x, -x]) if signed else x
        t = t[torch.randperm(t.numel(), generator=gen)]
        t = t[: (t.numel() // 2) * 2].view(2, -1).t()  # a non-contiguous one, for good measure
        for key in [0, 1, M64, C.rounding_key(5, 6, 7)]:
            codes, scales = C.encode_codes(t, signed, key)
            assert (scales == 2.0**k).all()
            assert same_bits(C.decode_codes(codes, scales, signed), t)


@pytest.mark.parametrize("signed", SIGNED)
def test_block_absmax_gets_a_top_binade_code(signed):
    """The block's largest magnitude, times inv, lies in (0.9375, 1.875]: its code is one of
    the top binade's [0.9375 .. 1.875], for any random bits, and exactly its value when
    it is on the grid."""
    gen = torch.Generator().manual_seed(8)
    max_code = fmt_ref(signed)[0]
    absmax = wide_values(3000, gen, -125, 127).abs()  # the k clamps are not reached
    top = C.code_value(torch.arange(max_code - 8, max_code + 1), signed)  # 0.9375 .. 1.875
    on_grid = top * pow2(torch.randint(-120, 120, (top.numel(),), generator=gen))
    absmax = torch.cat([absmax, on_grid, pow2(torch.tensor([-125, -1, 0, 1, 126]))])
    scale, inv = C.code_scale(absmax)
    assert ((absmax * inv > 0.9375) & (absmax * inv <= 1.875)).all()
    for random in [torch.tensor(0), torch.tensor(M32), uint32s(absmax.numel(), gen)]:
        codes = C.encode_code(absmax, inv, random, signed)
        assert ((codes.long() >= max_code - 8) & (codes.long() <= max_code)).all()
        decoded = C.decode_code(codes, scale, signed)
        # within one gap of the top binade (scale / 8), exactly on the grid values
        assert ((decoded.double() - absmax.double()).abs() < scale.double() / 8).all()
        n = on_grid.numel()
        assert torch.equal(decoded[-n - 5:], absmax[-n - 5:])
    # with all random bits set, every magnitude off the grid rounds up: above 1.75, to 1.875
    codes = C.encode_code(absmax, inv, torch.tensor(M32), signed).long()
    assert ((codes == max_code) | (absmax * inv < 1.75) | torch.isin(absmax * inv, top)).all()


@pytest.mark.parametrize("signed", SIGNED)
def test_grid_stable_when_the_scale_doubles(signed):
    """Decoded values re-encoded in a block whose absmax doubled (scale twice as large) stay
    what they are, for any random bits, unless they fall below the new smallest normal
    (2 * smallest_normal * scale); the ones below move by at most one (new) subnormal
    step. With the same scale, every decoded value stays."""
    _, bias, _, smallest_normal, step = fmt_ref(signed)
    gen = torch.Generator().manual_seed(15)
    n = 4 * 256
    x = wide_values(n, gen, -(bias + 8), 0)  # |x| < 0.75
    x[::256] = torch.tensor([1.5, 1.25 * 2**3, 1.75 * 2**20, 1.0])  # the absmax, on the grid
    if not signed:
        x = x.abs()
    codes, scales = C.encode_codes(x, signed, key=C.rounding_key(3, 1, 4))
    y = C.decode_codes(codes, scales, signed)
    assert torch.equal(y[::256], x[::256])
    s = scales.repeat_interleave(256)
    stays = y.abs() >= 2 * smallest_normal * s
    assert stays.float().mean() > 0.25 and (~stays & (y != 0)).any()
    # exp_avg_sq's floor (code 0, half a step) is no value a code is rounded to: it
    # re-encodes to 0 or 1 (the floor or one step)
    floor = (codes == 0) if not signed else torch.zeros_like(stays)
    assert signed or floor.any()
    # the same scale: all stay (the floor: within a step)
    for key in [0, 1, M64]:
        c2, s2 = C.encode_codes(y, signed, key)
        z = C.decode_codes(c2, s2, signed)
        assert same_bits(s2, scales) and same_bits(z[~floor], y[~floor])
        assert ((c2[floor] == 0) | (c2[floor] == 1)).all()
    # element by element, with the doubled scale's inverse and any random bits
    for random in [torch.tensor(0), torch.tensor(0xFFF), torch.tensor(M32), uint32s(n, gen)]:
        z = C.decode_code(C.encode_code(y, 0.5 / s, random, signed), 2 * s, signed)
        assert torch.equal(z[stays], y[stays])
        assert ((z - y).abs()[~stays] <= 2 * step * s[~stays]).all()
    # whole blocks: the absmax of each doubled
    y2 = y.clone()
    y2[::256] *= 2
    for key in range(20):
        c2, s2 = C.encode_codes(y2, signed, C.rounding_key(0, 9, key))
        assert torch.equal(s2, 2 * scales)
        z = C.decode_codes(c2, s2, signed)
        assert torch.equal(z[stays], y2[stays])
        assert ((z - y2).abs()[~stays] <= 2 * step * s[~stays]).all()


# --------------------------------------------------------------------------------------
# 8-bit codes: whole tensors.

@pytest.mark.parametrize("signed", SIGNED)
def test_roundtrip_within_one_code_step(signed):
    gen = torch.Generator().manual_seed(9)
    x = wide_values(1000, gen, -(fmt_ref(signed)[1] + 12), 8)  # down past the subnormals
    if not signed:
        x = x.abs()
    codes, scales = C.encode_codes(x, signed, key=C.rounding_key(1, 2, 3))
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    assert scales.shape == (C.num_code_blocks(1000),) == (4,)
    assert same_bits(scales, C.code_scale(C.block_absmax(x))[0])
    y = C.decode_codes(codes, scales, signed)
    assert y.dtype == torch.float32 and y.shape == x.shape
    scale = scales.repeat_interleave(256)[:1000]
    assert ((y.double() - x.double()).abs() < gap_bound(x, scale, signed)).all()
    assert ((torch.sign(y) == torch.sign(x)) | (y == 0)).all()
    # subnormal codes were used, and not all of them rounded to zero
    mag = codes.long() & (0x7F if signed else 0xFF)
    assert ((mag > 0) & (mag < 8)).any() and (mag >= 8).any()


@pytest.mark.parametrize("signed", SIGNED)
def test_encode_codes_unbiased(signed):
    """A block over many binades, the subnormal range included: the mean of 1500 decodes
    within 5 standard errors of x (one draw lies within one gap, so its sd <= gap / 2)."""
    bias, smallest_normal = fmt_ref(signed)[1], fmt_ref(signed)[3]
    gen = torch.Generator().manual_seed(11)
    x = wide_values(256, gen, -(bias + 6), 0)
    x[0] = 1.0  # the block's absmax: scale 1
    x[1:20] = torch.rand(19, generator=gen) * smallest_normal  # subnormal
    if not signed:
        x = x.abs()
    n = 1500
    total = torch.zeros(256, dtype=torch.float64)
    for k in range(n):
        codes, scales = C.encode_codes(x, signed, C.moment_key(C.rounding_key(0, 0, k)))
        assert scales.item() == 1.0
        total += C.decode_codes(codes, scales, signed).double()
    mean = total / n
    gap = gap_bound(x, torch.tensor(1.0), signed)
    # below exp_avg_sq's smallest step the floor biases it: code 0 (probability 1 - x /
    # step) decodes to step / 2, so the mean is step / 2 + x / 2
    step = fmt_ref(signed)[4]
    expected = x.double()
    if not signed:
        below = expected < step
        assert below.sum() > 10
        expected = torch.where(below, step / 2 + expected / 2, expected)
    err = (mean - expected).abs()
    assert (err <= 5 * gap / 2 / math.sqrt(n) + gap * 2.0**-19).all()
    # and it is no rounding to nearest (mean error ~ gap / 4 there)
    assert (err / gap).mean() < 0.05


@pytest.mark.parametrize("signed", SIGNED)
def test_encode_codes_random_bits(signed):
    """Each element encoded with moment_random(moment_bits(key, its memory index), which):
    which 0 (the low half) for exp_avg (signed), 1 (the high half) for exp_avg_sq, keys
    with high bits set included; the other half gives other codes."""
    which = 0 if signed else 1
    gen = torch.Generator().manual_seed(17 + signed)
    x = wide_values(700, gen, -12, 4)
    if not signed:
        x = x.abs()
    x_list, x_bits = x.tolist(), float_bits(x)
    index = torch.arange(700)
    for key in MOMENT_KEYS:
        codes, scales = C.encode_codes(x, signed, key)
        inv = C.code_scale(C.block_absmax(x))[1].repeat_interleave(256)[:700]
        random = C.moment_random(C.moment_bits(key, index), which)
        assert torch.equal(codes, C.encode_code(x, inv, random, signed))
        # the scalar reference all the way
        expected = [encode_ref(v, b, iv, moment_random_ref(moment_bits_ref(key, i), which),
                               signed)
                    for i, (v, b, iv) in enumerate(zip(x_list, x_bits, inv.tolist()))]
        assert codes.tolist() == expected
        other = C.moment_random(C.moment_bits(key, index), 1 - which)
        assert not torch.equal(codes, C.encode_code(x, inv, other, signed))
        assert not torch.equal(codes, C.encode_code(x, inv, C.rounding_bits(key, index), signed))


@pytest.mark.parametrize("signed", SIGNED)
def test_nan_and_inf_blocks(signed):
    """A NaN or an infinity makes its block's scale NaN or inf (inverse 0): the block
    decodes NaN, but for an infinite element, which stays infinite (a NaN and an infinity
    together: all NaN)."""
    max_code = fmt_ref(signed)[0]
    x = torch.rand(3 * 256, generator=torch.Generator().manual_seed(12)) + 0.5
    if signed:
        x[::3] *= -1
    x[256 + 17] = math.nan
    codes, scales = C.encode_codes(x, signed, key=4)
    assert torch.isnan(scales[1]) and torch.isfinite(scales[[0, 2]]).all()
    assert (codes[256 + 17].long() & 0x7F if signed else codes[256 + 17].long()) == max_code
    y = C.decode_codes(codes, scales, signed)
    assert torch.isnan(y[256:512]).all()
    assert torch.isfinite(y[:256]).all() and torch.isfinite(y[512:]).all()
    for inf in [math.inf, -math.inf] if signed else [math.inf]:
        x[256 + 17] = inf
        codes, scales = C.encode_codes(x, signed, key=4)
        assert scales[1] == math.inf and torch.isfinite(scales[[0, 2]]).all()
        y = C.decode_codes(codes, scales, signed)
        assert y[256 + 17] == inf
        assert torch.isnan(y[256:256 + 17]).all() and torch.isnan(y[256 + 18:512]).all()
        assert torch.isfinite(y[:256]).all() and torch.isfinite(y[512:]).all()
    x[256 + 40] = math.nan  # with the infinity
    codes, scales = C.encode_codes(x, signed, key=4)
    assert torch.isnan(scales[1])
    assert torch.isnan(C.decode_codes(codes, scales, signed)[256:512]).all()


@pytest.mark.parametrize("signed", SIGNED)
def test_zero_block(signed):
    x = torch.zeros(300)
    x[:256] = 1.0 / 3
    codes, scales = C.encode_codes(x, signed, key=5)
    assert scales[0] == 0.25 and scales[1] == 0 and (codes[256:] == 0).all()
    y = C.decode_codes(codes, scales, signed)
    assert same_bits(y[256:], x[256:])
    if signed:  # -0.0: sign bit only, decodes -0.0
        codes, scales = C.encode_codes(-x, signed, key=5)
        assert (codes[256:] == 0x80).all()
        assert same_bits(C.decode_codes(codes, scales, signed)[256:], -x[256:])


@pytest.mark.parametrize("signed", SIGNED)
def test_partial_last_block(signed):
    gen = torch.Generator().manual_seed(13)
    x = torch.rand(600, generator=gen)
    x[512:] *= 1e-3  # the last block (88 elements) has its own scale
    if signed:
        x = x - 0.5e-3 * (torch.arange(600) >= 512)
    codes, scales = C.encode_codes(x, signed, key=6)
    assert scales.shape == (3,)
    absmax = torch.stack([b.abs().max() for b in x.split(256)])
    assert torch.equal(C.block_absmax(x), absmax)
    assert same_bits(scales, C.code_scale(absmax)[0])
    assert scales[2] < scales[1] / 256
    y = C.decode_codes(codes, scales, signed)
    scale = scales.repeat_interleave(256)[:600]
    assert ((y.double() - x.double()).abs() < gap_bound(x, scale, signed)).all()
    # the elements' random bits are those of their indices, wherever the block ends
    _, inv = C.code_scale(absmax)
    random = C.moment_random(C.moment_bits(6, torch.arange(600)), 0 if signed else 1)
    assert torch.equal(codes, C.encode_code(x, inv.repeat_interleave(256)[:600], random, signed))
    empty_codes, empty_scales = C.encode_codes(torch.zeros(0), signed, key=6)
    assert empty_codes.shape == (0,) and empty_scales.shape == (0,)
    assert C.decode_codes(empty_codes, empty_scales, signed).shape == (0,)


# --------------------------------------------------------------------------------------
# Memory order.

def test_memory_order_flat_is_a_view_in_memory_order():
    views = [lambda b: b, lambda b: b.transpose(0, 2), lambda b: b.permute(1, 2, 0),
             lambda b: b[1], lambda b: b[1:], lambda b: b.unsqueeze(1).transpose(1, 3),
             lambda b: b[1, 2, 3]]
    for view in views:
        t = view(torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4))
        flat = C.memory_order_flat(t)
        assert flat.dim() == 1 and flat.numel() == t.numel()
        assert flat.data_ptr() == t.data_ptr()
        assert torch.equal(flat, flat.sort().values)  # ascending in memory
        flat[-1] = -1.0
        assert t.min() == -1.0  # a view
    for bad in [torch.zeros(4, 6)[:, ::2], torch.zeros(3).expand(4, 3)]:
        with pytest.raises(ValueError):
            C.memory_order_flat(bad)


@pytest.mark.parametrize("signed", SIGNED)
def test_non_contiguous_uses_memory_order(signed):
    gen = torch.Generator().manual_seed(14)
    x = torch.rand(40, 48, generator=gen) - (0.5 if signed else 0.0)
    x[:, :8] *= 100.0  # columns of different sizes: blocks of rows differ from columns
    t = x.t()
    codes, scales = C.encode_codes(t, signed, key=7)
    assert codes.shape == t.shape and codes.stride() == t.stride()
    codes_x, scales_x = C.encode_codes(x, signed, key=7)
    assert torch.equal(codes.t(), codes_x) and same_bits(scales, scales_x)
    decoded = C.decode_codes(codes, scales, signed)
    assert decoded.stride() == t.stride()
    assert same_bits(decoded.t(), C.decode_codes(codes_x, scales_x, signed))
    # in logical order the blocks (and so the scales) would be others
    assert not torch.equal(C.encode_codes(t.contiguous(), signed, key=7)[1], scales)
    for which in [None, 0, 1]:
        bf = C.stochastic_bf16(t, 8, which)
        assert bf.stride() == t.stride()
        bf_x = C.stochastic_bf16(x, 8, which)
        assert torch.equal(bf.t().view(torch.int16), bf_x.view(torch.int16))


def test_errors():
    with pytest.raises(TypeError):
        C.encode_codes(torch.zeros(4, dtype=torch.float64), True, 0)
    with pytest.raises(TypeError):
        C.stochastic_bf16(torch.zeros(4, dtype=torch.bfloat16), 0)
    with pytest.raises(ValueError):
        C.decode_codes(torch.zeros(300, dtype=torch.uint8), torch.zeros(1), True)
    with pytest.raises(ValueError):
        C.rounding_key(0, 0, -1)
