// The 8-bit codes of compact moments: their format, block scales, encoding and decoding.
#pragma once

#include <cmath>
#include <cstdint>

#include "portable.h"

namespace adamx {

// 8-bit codes (StateKind::Codes8). The elements of a tensor, in memory order, form blocks
// of kCodeBlock (the last may be shorter); each block has a float32 scale, a power of two,
// and each element a code whose magnitude part c stands for code_value(c) * scale. The
// values form a small floating-point format with 3 mantissa bits and subnormals, largest
// value 1.875: for exp_avg a sign bit and 7 bits (e4m3: 15 binades of normal numbers down
// to 2^-14, then 8 subnormal steps of 2^-17), for exp_avg_sq, never negative, 8 bits (e5m3:
// down to 2^-30, steps of 2^-33, and code 0 decoding to 2^-34, not zero: see code_value).
// Like an fp8 number, each value has about the same relative precision (1/16 to 1/8), so
// the small moments of a block are not lost as they would be in a linear code. The scale
// is the smallest power of two that brings the block's largest magnitude to at most 1.875;
// being a power of two, it never moves the grid of values when it changes (a value on the
// grid stays on it), so a moment that does not change is not rounded anew.
//
// A code is the magnitude rounded stochastically in that format: 20 random bits added to
// the float32's bits below the format's last mantissa bit, then truncated, which rounds up
// with probability equal to the distance from the lower value. The stored moments are
// unbiased: rounding to nearest would stall, as bfloat16 does, and worse (a step moves
// exp_avg_sq by 1e-3 of the way to g^2; the gaps here are 6-12%). With a fixed grid, the
// rounding noise of a step is about sqrt(change * gap), not the gap: what lets a moment
// averaged over 1000 steps (beta2 = 0.999) keep its value to ~20% rather than ~80%.
// Encoding and decoding are a few integer operations, the same on every ISA and the GPU.
constexpr int64_t kCodeBlock = 256;

// Number of blocks of codes of a tensor of `numel` elements.
ADAMX_HD int64_t code_blocks(int64_t numel) { return (numel + kCodeBlock - 1) / kCodeBlock; }

template <bool kSigned>
struct CodeFormat {
  static constexpr uint32_t kMaxCode = kSigned ? 127u : 255u;
  // A normal code c (c >= 8) is 2^((c >> 3) - kBias) * (1 + (c & 7) / 8): its float32 bits
  // are (c << 20) + kOffset. A subnormal one (c < 8) is c * kSubnormalStep, but for
  // exp_avg_sq's code 0 (kZeroIsFloor): it is half a step, not zero (see code_value).
  static constexpr bool kZeroIsFloor = !kSigned;
  static constexpr int kBias = kSigned ? 15 : 31;
  static constexpr uint32_t kOffset = uint32_t(127 - kBias) << 23;
  static constexpr float kSmallestNormal = kSigned ? 0x1p-14f : 0x1p-30f;
  static constexpr float kSubnormalStep = kSigned ? 0x1p-17f : 0x1p-33f;
};

// The value of magnitude code c, in units of the block's scale (exact). The selects here
// and in encode_code are masks, not branches: both sides are computed, so that the CPU
// kernel's lane loops vectorize (GCC does not speculate a float operation past a branch).
//
// exp_avg_sq has no zero: its code 0 stands for [0, kSubnormalStep) and decodes to the
// middle, kSubnormalStep / 2 (times the scale), a floor tied to the block's scale. A block
// whose largest moment is large puts the exp_avg_sq of an element with a ~1e-5 times
// smaller grad below the smallest step, while its exp_avg (of a grad, not a square, so of
// half the exponent range) still has a code: decoded as zero, the element's step would be
// lr * m / eps, hundreds of lr. With the floor, its |m| / sqrt(v) is at most its exp_avg's
// code over exp_avg's smallest step, times (exp_avg's scale / sqrt(exp_avg_sq's scale)),
// a few lr (docs/lean-state.md). The encoding is unchanged (a zero still encodes to code
// 0), so codes written before the floor existed keep their meaning but for that one value.
// An all-zero block (scale 0) still decodes to zeros.
template <bool kSigned>
ADAMX_HD float code_value(uint32_t c) {
  using F = CodeFormat<kSigned>;
  // In half steps: 2 * (c & 7), plus 1 for a floored code 0 (exact small integers).
  const uint32_t halves = ((c & 7u) << 1) | (F::kZeroIsFloor ? uint32_t(c == 0u) : 0u);
  const uint32_t subnormal =
      bits_of(static_cast<float>(int32_t(halves)) * (F::kSubnormalStep * 0.5f));
  const uint32_t normal = (c << 20) + F::kOffset;
  const uint32_t is_subnormal = 0u - uint32_t(c < 8u);
  return float_from_bits((subnormal & is_subnormal) | (normal & ~is_subnormal));
}

template <bool kSigned>
ADAMX_HD float decode_code(uint8_t code, float scale) {
  const uint32_t magnitude = kSigned ? code & 0x7fu : code;
  const uint32_t sign = kSigned ? (uint32_t(code) & 0x80u) << 24 : 0u;
  const float value = float_from_bits(bits_of(code_value<kSigned>(magnitude)) | sign) * scale;
  if constexpr (!CodeFormat<kSigned>::kZeroIsFloor) {
    return value;
  } else {
    // In a block made non-finite (scale inf: an infinity among its moments), the floor
    // would decode to inf; it decodes to NaN, as a zero did (0 * inf), so that the block
    // still turns NaN but for its infinite elements. 0 * scale is +0 or NaN, added to
    // code 0's value only (adding +0 changes nothing); a mask, not a branch.
    const uint32_t is_zero = 0u - uint32_t(magnitude == 0u);
    return value + float_from_bits(bits_of(0.0f * scale) & is_zero);
  }
}

// A block's scale (a power of two: the smallest 2^k with absmax <= 1.875 * 2^k, k in
// [-126, 126]) and its inverse, from the block's largest magnitude. An all-zero block has
// scale 0. A NaN or an infinity makes the whole block NaN (scale NaN or inf, inverse 0;
// the infinite element stays infinite).
struct CodeScale {
  float scale, inv;
};
ADAMX_HD CodeScale code_scale(float absmax) {
  if (!(absmax <= 3.402823466e38f)) return {absmax, 0.0f};
  if (absmax == 0.0f) return {0.0f, 0.0f};
  const uint32_t b = bits_of(absmax);
  int k = int(b >> 23) - 127 + ((b & 0x7fffffu) > 0x700000u ? 1 : 0);
  k = k < -126 ? -126 : k > 126 ? 126 : k;
  return {float_from_bits(uint32_t(k + 127) << 23), float_from_bits(uint32_t(127 - k) << 23)};
}

// The code of x (a moment) in a block of inverse scale `inv`, rounded stochastically with
// `random`'s top 20 bits. Branch-free, so that the CPU kernel's lane loop vectorizes.
template <bool kSigned>
ADAMX_HD uint8_t encode_code(float x, float inv, uint32_t random) {
  using F = CodeFormat<kSigned>;
  const float magnitude = (kSigned ? std::fabs(x) : x) * inv;  // exact but under/overflow
  // Subnormals: rounded as the normal numbers of the binade above kSmallestNormal, less
  // its 8 codes (adding kSmallestNormal rounds away only bits far below the code's).
  const uint32_t small = 0u - uint32_t(magnitude < F::kSmallestNormal);  // none for NaN
  const float a = magnitude + float_from_bits(bits_of(F::kSmallestNormal) & small);
  const uint32_t u = ((bits_of(a) + (random >> 12)) >> 20) - (F::kOffset >> 20) - (small & 8u);
  const uint32_t c = u < F::kMaxCode ? u : F::kMaxCode;
  return static_cast<uint8_t>(kSigned ? c | ((bits_of(x) >> 24) & 0x80u) : c);
}

}  // namespace adamx
