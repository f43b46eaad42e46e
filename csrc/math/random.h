// The counter-based random bits of stochastic rounding (the param's and the compact
// moments'), and the stochastic rounding of a float to bfloat16.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "portable.h"

namespace adamx {

// Counter-based random bits for stochastic rounding: a hash of (seed, param, step,
// element), the same on every thread, ISA and device. `rounding_key` mixes the first three
// once per tensor and step (splitmix64's finalizer); `rounding_bits` mixes in the
// element's index with two rounds of a 32-bit integer hash (Wellons' "lowbias32"), which
// the CPU kernel vectorizes. `param` is the param's identity (adamx.Adam: its index in the
// optimizer, as state_dict numbers it), and the element's index is its place in the whole
// param (a shard's elements count from the shard's offset: RoundingKeys::offset), so that
// the bits of an element do not depend on which call, list position or rank steps it.
ADAMX_HD uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

ADAMX_HD uint64_t rounding_key(int64_t seed, uint32_t param, double step) {
  const uint64_t s = mix64(static_cast<uint64_t>(seed) + 0x9e3779b97f4a7c15ull);
  return mix64(mix64(s ^ param) ^ static_cast<uint64_t>(step));
}

ADAMX_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

// The bits of element index_lo + 2^32 * index_hi: rounding_bits32(key_lo, key_hi ^
// index_hi, index_lo) with key_lo/key_hi the key's halves (the CPU kernel hoists the second
// argument out of its loop, and its lanes' hashes stay 32-bit).
ADAMX_HD uint32_t rounding_bits32(uint32_t key_lo, uint32_t key_hi_index_hi, uint32_t index_lo) {
  return hash32(hash32(index_lo ^ key_lo) ^ key_hi_index_hi);
}

ADAMX_HD uint32_t rounding_bits(uint64_t key, int64_t index) {
  const uint64_t i = static_cast<uint64_t>(index);
  return rounding_bits32(static_cast<uint32_t>(key),
                         static_cast<uint32_t>(key >> 32) ^ static_cast<uint32_t>(i >> 32),
                         static_cast<uint32_t>(i));
}

// x rounded to a neighbouring bfloat16 at random, up (away from zero) with probability
// equal to the distance from the lower neighbour in units of the gap: adding 16 random
// bits below bfloat16's last bit and truncating does that. A NaN keeps its sign and the
// top of its payload, made quiet (truncating a payload held in the low bits alone would
// give an infinity); magnitudes past bfloat16's largest finite value may round to
// infinity. Branch-free, so that the CPU kernel's lane loop vectorizes.
ADAMX_HD c10::BFloat16 round_bf16_stochastic(float x, uint32_t random) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  u = x != x ? (u | 0x00400000u) : u + (random & 0xffffu);
  return c10::BFloat16(static_cast<uint16_t>(u >> 16), c10::BFloat16::from_bits());
}

// The random bits of the compact moments' stochastic rounding: a stream of their own,
// apart from the param's, keyed like it (`moment_key`), and cheaper, since every element
// of a compact state needs them: one round of hash32 per element (`moment_bits`; the key's
// and the index's high halves are folded into the key once per 2^32 elements), whose low
// 16 bits round exp_avg and high 16 bits exp_avg_sq (`moment_random` places a half where
// both roundings read: the low 16 bits for bfloat16, the top 20 for codes; a rounding
// decided on 16 bits is off by at most 2^-16 of a gap).
ADAMX_HD uint64_t moment_key(uint64_t key) { return mix64(key + 0x632be59bd9b4e019ull); }

ADAMX_HD uint32_t fold_key(uint64_t key, uint32_t index_hi) {
  return static_cast<uint32_t>(key) ^ hash32(static_cast<uint32_t>(key >> 32) ^ index_hi);
}

ADAMX_HD uint32_t moment_bits32(uint32_t folded_key, uint32_t index_lo) {
  return hash32(index_lo ^ folded_key);
}

ADAMX_HD uint32_t moment_bits(uint64_t key, int64_t index) {
  const uint64_t i = static_cast<uint64_t>(index);
  return moment_bits32(fold_key(key, static_cast<uint32_t>(i >> 32)), static_cast<uint32_t>(i));
}

ADAMX_HD uint32_t moment_random(uint32_t bits, int which) {
  const uint32_t half = which ? bits >> 16 : bits & 0xffffu;
  return (half << 16) | half;
}

// The random streams of one tensor's step, from its rounding_key: the param's
// (stochastic_rounding) and its compact moments'; element j of the tensor draws element
// `offset + j` of each (offset: where the tensor starts in its whole param, 0 unless it is
// a shard).
struct RoundingKeys {
  uint64_t param = 0, moments = 0;
  int64_t offset = 0;
  RoundingKeys() = default;
  ADAMX_HD RoundingKeys(uint64_t key, int64_t first)
      : param(key), moments(moment_key(key)), offset(first) {}
};

}  // namespace adamx
