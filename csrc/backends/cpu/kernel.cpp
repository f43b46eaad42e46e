// The CPU Adam kernel for one instruction set. setup.py compiles this file once per
// ISA, with that ISA's compiler flags and CPU_CAPABILITY set, so that ATen's
// Vectorized<T> is 512, 256 or 128 bits wide; adam_cpu.cpp picks one at run time.
// Everything here lives in a namespace named after the ISA, so the copies never clash.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "kernel.h"

#if defined(CPU_CAPABILITY_AVX512)
#define ADAMX_ISA_ENTRY range_kernel_avx512
#elif defined(CPU_CAPABILITY_AVX2)
#define ADAMX_ISA_ENTRY range_kernel_avx2
#else
#define ADAMX_ISA_ENTRY range_kernel_default
#endif

namespace adamx {

// SIMD versions of the scalar helpers the shared update uses.
template <class T>
struct MathOps<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V sqrt(const V& x) { return x.sqrt(); }
  static V abs(const V& x) { return x.abs(); }
  // NaN-propagating, picking the operand the scalar MathOps::max picks (at::vec::maximum
  // would return an all-ones NaN instead), so NaN payloads agree across ISAs and the CUDA
  // kernel body.
  static V max(const V& a, const V& b) { return V::blendv(b, a, (a != a) | (b < a)); }
  // The scalar same_value as a mask: equal as floats and of one sign (the sign of a ^ b,
  // set on 1: equal values differ in the sign bit alone, and only as zeros), or both NaN.
  static V same_value(const V& a, const V& b) {
    const V one(T(1));
    return ((a == b) & (((a ^ b) | one) == one)) | ((a != a) & (b != b));
  }
  static V select(const V& c, const V& a, const V& b) { return V::blendv(b, a, c); }
  static V fma(const V& a, const V& b, const V& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    return at::vec::fmadd(a, b, c);
#else
    // The generic Vectorized has no fused multiply-add (it rounds twice); use the
    // correctly rounded one so every ISA gives the same bits.
    return V::loadu(fma_lanes(a, b, c).data());
#endif
  }

 private:
  struct Lanes {
    alignas(64) T v[V::size()];
    const T* data() const { return v; }
  };
  static Lanes fma_lanes(const V& a, const V& b, const V& c) {
    Lanes la, lb, lc;
    a.store(la.v);
    b.store(lb.v);
    c.store(lc.v);
    for (int i = 0; i < V::size(); ++i) la.v[i] = std::fma(la.v[i], lb.v[i], lc.v[i]);
    return la;
  }
};

namespace cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// One iteration's elements of one operand of storage type X, as `kParts` vectors of the
// compute type C: a vector of float16/bfloat16 widens to two float vectors; float or
// double loads `kParts` vectors (two float vectors beside reduced-precision params, for
// the master copy and fp32 state). `kPartial`: only the first `count` elements exist (the
// end of a range); a compile-time flag, so that whole vectors load and store without a
// branch.
template <class C, int kParts>
struct Lanes {
  Vectorized<C> v[kParts];
};

template <class C, int kParts, class X, bool kPartial>
inline Lanes<C, kParts> load_lanes(const void* base, int64_t i, int64_t count) {
  const X* ptr = static_cast<const X*>(base) + i;
  Lanes<C, kParts> out;
  if constexpr (kReducedFloat<X>) {
    static_assert(kParts == 2, "a vector of float16/bfloat16 widens to two");
    const auto x = kPartial ? Vectorized<X>::loadu(ptr, count) : Vectorized<X>::loadu(ptr);
    auto [lo, hi] = at::vec::convert_to_float<X>(x);
    out.v[0] = lo;
    out.v[1] = hi;
  } else if constexpr (!kPartial) {
    constexpr int64_t N = Vectorized<C>::size();
    for (int k = 0; k < kParts; ++k) out.v[k] = Vectorized<C>::loadu(ptr + k * N);
  } else {
    constexpr int64_t N = Vectorized<C>::size();
    for (int k = 0; k < kParts; ++k) {
      const int64_t c = std::clamp<int64_t>(count - k * N, 0, N);
      out.v[k] = c > 0 ? Vectorized<C>::loadu(ptr + k * N, c) : Vectorized<C>(0);
    }
  }
  return out;
}

template <class X, bool kPartial, class C, int kParts>
inline void store_lanes(const Lanes<C, kParts>& x, void* base, int64_t i, int64_t count) {
  X* ptr = static_cast<X*>(base) + i;
  if constexpr (kReducedFloat<X>) {
    static_assert(kParts == 2, "rounded to nearest in float16/bfloat16: params only");
    const auto y = at::vec::convert_from_float<X>(x.v[0], x.v[1]);
    if (kPartial) y.store(ptr, count);
    else y.store(ptr);
  } else if constexpr (!kPartial) {
    for (int k = 0; k < kParts; ++k) x.v[k].store(ptr + k * Vectorized<C>::size());
  } else {
    constexpr int64_t N = Vectorized<C>::size();
    for (int k = 0; k < kParts; ++k) {
      const int64_t c = std::clamp<int64_t>(count - k * N, 0, N);
      if (c > 0) x.v[k].store(ptr + k * N, c);
    }
  }
}

// rounding_bits(key, index + j) for lanes j = 0, 1, ...: the 32-bit hashes of lanes whose
// index has the high half of `index` (operator()), unless the lanes cross a multiple of
// 2^32 (crosses(): then `carrying` gives the lanes past it their incremented high half).
// Lanes start at a multiple of the vector width in the tensor, but a shard's offset
// (RoundingKeys::offset) may put a crossing anywhere.
struct LaneBits {
  uint32_t key_lo, high, high_carried, base_lo;
  LaneBits(uint64_t key, int64_t index)
      : key_lo(static_cast<uint32_t>(key)),
        high(static_cast<uint32_t>(key >> 32) ^ static_cast<uint32_t>(uint64_t(index) >> 32)),
        high_carried(static_cast<uint32_t>(key >> 32) ^
                     static_cast<uint32_t>((uint64_t(index) >> 32) + 1)),
        base_lo(static_cast<uint32_t>(index)) {}
  bool crosses(int64_t lanes) const { return base_lo > UINT32_MAX - uint32_t(lanes - 1); }
  uint32_t operator()(int j) const { return rounding_bits32(key_lo, high, base_lo + uint32_t(j)); }
  uint32_t carrying(int j) const {
    const uint32_t lo = base_lo + uint32_t(j);
    return rounding_bits32(key_lo, lo < base_lo ? high_carried : high, lo);
  }
};

// moment_bits(key, index + j) for lanes j = 0, 1, ..., likewise (the folded key hoisted).
struct MomentBits {
  uint32_t folded, folded_carried, base_lo;
  MomentBits(uint64_t key, int64_t index)
      : folded(fold_key(key, static_cast<uint32_t>(uint64_t(index) >> 32))),
        folded_carried(fold_key(key, static_cast<uint32_t>((uint64_t(index) >> 32) + 1))),
        base_lo(static_cast<uint32_t>(index)) {}
  bool crosses(int64_t lanes) const { return base_lo > UINT32_MAX - uint32_t(lanes - 1); }
  uint32_t operator()(int j) const { return moment_bits32(folded, base_lo + uint32_t(j)); }
  uint32_t carrying(int j) const {
    const uint32_t lo = base_lo + uint32_t(j);
    return moment_bits32(lo < base_lo ? folded_carried : folded, lo);
  }
};

// f(j, bits of lane j) for j < lanes: a loop the compiler vectorizes (the hashes'
// multiplications become vector ones), and its copy for lanes that cross a multiple of 2^32.
template <class Bits, class F>
inline void for_each_lane(const Bits& bits, int64_t lanes, F&& f) {
  if (!bits.crosses(lanes)) [[likely]] {
    for (int j = 0; j < lanes; ++j) f(j, bits(j));
  } else {
    for (int j = 0; j < lanes; ++j) f(j, bits.carrying(j));
  }
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The SIMD code of compact moments on AVX-512 and AVX2: each ISA's intrinsics behind one
// interface, CodeOps, for the 8-bit block (update_code_block_simd) and the stochastic
// rounding of bfloat16 moments (store_stochastic_moments; the params' rounding,
// store_stochastic, keeps its lane loop: written so, its two rounds of hashing measured
// 0.80-0.92 ns per element on AVX-512 against the loop's 0.79-0.83).
//
// exp_avg's e4m3 codes have float16's exponent bias (15): a code's magnitude at bits 7-14
// and its sign at bit 15 are the float16 of its value, subnormals included, which vcvtph2ps
// widens exactly. Shifted left by 7, a code has its sign at bit 14; adding that bit to
// itself moves it to bit 15 (code_half).
#if defined(CPU_CAPABILITY_AVX512)
struct CodeOps {
  static constexpr int64_t N = 16;
  using Bits = __m512i;

  static __mmask16 lanes(int64_t count) {
    return count >= N ? __mmask16(0xffff) : static_cast<__mmask16>((1u << count) - 1u);
  }
  static __m128i load(const uint8_t* p, int64_t count) {
    if (count >= N) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm_maskz_loadu_epi8(lanes(count), p);
  }
  // decode_code<true> of codes [0, count) (the other lanes 0).
  static Vectorized<float> decode_m(const uint8_t* p, int64_t count, __m512 scale) {
    const __m256i t = _mm256_slli_epi16(_mm256_cvtepu8_epi16(load(p, count)), 7);
    const __m256i half = _mm256_add_epi16(t, _mm256_and_si256(t, _mm256_set1_epi16(0x4000)));
    return _mm512_maskz_mul_ps(lanes(count), _mm512_cvtph_ps(half), scale);
  }
  // decode_code<false> of codes [0, count) (the other lanes 0), with a finite scale:
  // code_value's float bits of normal codes, its subnormal steps where a lane has one.
  static Vectorized<float> decode_v(const uint8_t* p, int64_t count, __m512 scale) {
    using F = CodeFormat<false>;
    const __m512i c = _mm512_cvtepu8_epi32(load(p, count));
    __m512i bits = _mm512_add_epi32(_mm512_slli_epi32(c, 20), _mm512_set1_epi32(int(F::kOffset)));
    const __mmask16 subnormal = _mm512_cmplt_epu32_mask(c, _mm512_set1_epi32(8));
    if (subnormal) {
      const __m512i twice = _mm512_slli_epi32(c, 1);
      const __m512i halves = _mm512_mask_add_epi32(twice, _mm512_testn_epi32_mask(c, c), twice,
                                                   _mm512_set1_epi32(1));
      const __m512 value = _mm512_mul_ps(_mm512_cvtepi32_ps(halves),
                                         _mm512_set1_ps(F::kSubnormalStep * 0.5f));
      bits = _mm512_mask_blend_epi32(subnormal, bits, _mm512_castps_si512(value));
    }
    return _mm512_maskz_mul_ps(lanes(count), _mm512_castsi512_ps(bits), scale);
  }
  static Bits zero() { return _mm512_setzero_si512(); }
  // The running maximum of the magnitudes' bits (without their signs).
  static Bits max(Bits current, __m512 x) {
    return _mm512_max_epu32(current, _mm512_and_si512(_mm512_castps_si512(x),
                                                      _mm512_set1_epi32(0x7fffffff)));
  }
  static uint32_t reduce(Bits x) { return static_cast<uint32_t>(_mm512_reduce_max_epu32(x)); }
  static Bits index(uint32_t first) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_add_epi32(_mm512_set1_epi32(int(first)), iota);
  }
  // encode_code's code before the sign: a mask says which lanes are under the smallest
  // normal value.
  template <bool kSigned>
  static Bits encode(__m512 x, __m512 inv, Bits random) {
    using F = CodeFormat<kSigned>;
    const __m512 smallest = _mm512_set1_ps(F::kSmallestNormal);
    const __m512 magnitude = _mm512_mul_ps(kSigned ? _mm512_abs_ps(x) : x, inv);
    const __mmask16 small = _mm512_cmp_ps_mask(magnitude, smallest, _CMP_LT_OQ);
    const __m512 a = _mm512_mask_add_ps(magnitude, small, magnitude, smallest);
    __m512i u = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(a), random), 20);
    u = _mm512_sub_epi32(u, _mm512_set1_epi32(int(F::kOffset >> 20)));
    u = _mm512_mask_sub_epi32(u, small, u, _mm512_set1_epi32(8));
    __m512i c = _mm512_min_epu32(u, _mm512_set1_epi32(int(F::kMaxCode)));
    if constexpr (kSigned)
      c = _mm512_or_si512(c, _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(x), 24),
                                              _mm512_set1_epi32(0x80)));
    return c;
  }
  static void store(uint8_t* p, int64_t count, Bits codes) {
    _mm_mask_storeu_epi8(p, lanes(count), _mm512_cvtepi32_epi8(codes));
  }
  static Bits mullo(Bits a, uint32_t c) { return _mm512_mullo_epi32(a, _mm512_set1_epi32(int(c))); }
  static Bits srl(Bits a, int n) { return _mm512_srli_epi32(a, n); }
  static Bits sll(Bits a, int n) { return _mm512_slli_epi32(a, n); }
  static Bits xor_(Bits a, Bits b) { return _mm512_xor_si512(a, b); }
  static Bits or_(Bits a, Bits b) { return _mm512_or_si512(a, b); }
  static Bits and_(Bits a, uint32_t c) { return _mm512_and_si512(a, _mm512_set1_epi32(int(c))); }
  static Bits set1(uint32_t c) { return _mm512_set1_epi32(int(c)); }
  // round_bf16_stochastic of each lane with `random` (16 bits a lane): the bfloat16's
  // bits, one per 32-bit lane.
  static Bits round_bf16(__m512 x, Bits random) {
    const __m512i u = _mm512_castps_si512(x);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_srli_epi32(
        _mm512_mask_or_epi32(_mm512_add_epi32(u, random), nan, u, set1(0x00400000u)), 16);
  }
  static void store_halves(uint16_t* p, Bits halves) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(halves));
  }
};
#else
struct CodeOps {
  static constexpr int64_t N = 8;
  using Bits = __m256i;

  // All ones in lanes [0, count).
  static __m256i lanes(int64_t count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(count, N))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static __m128i load(const uint8_t* p, int64_t count) {
    int64_t bytes = 0;
    std::memcpy(&bytes, p, static_cast<size_t>(std::min<int64_t>(count, N)));
    return _mm_cvtsi64_si128(bytes);
  }
  static Vectorized<float> decode_m(const uint8_t* p, int64_t count, __m256 scale) {
    const __m128i t = _mm_slli_epi16(_mm_cvtepu8_epi16(load(p, count)), 7);
    const __m128i half = _mm_add_epi16(t, _mm_and_si128(t, _mm_set1_epi16(0x4000)));
    return _mm256_and_ps(_mm256_mul_ps(_mm256_cvtph_ps(half), scale),
                         _mm256_castsi256_ps(lanes(count)));
  }
  static Vectorized<float> decode_v(const uint8_t* p, int64_t count, __m256 scale) {
    using F = CodeFormat<false>;
    const __m256i c = _mm256_cvtepu8_epi32(load(p, count));
    __m256i bits = _mm256_add_epi32(_mm256_slli_epi32(c, 20), _mm256_set1_epi32(int(F::kOffset)));
    const __m256i subnormal = _mm256_cmpgt_epi32(_mm256_set1_epi32(8), c);
    if (!_mm256_testz_si256(subnormal, subnormal)) {
      const __m256i zero = _mm256_cmpeq_epi32(c, _mm256_setzero_si256());
      const __m256i halves = _mm256_or_si256(_mm256_slli_epi32(c, 1),
                                             _mm256_and_si256(zero, _mm256_set1_epi32(1)));
      const __m256 value = _mm256_mul_ps(_mm256_cvtepi32_ps(halves),
                                         _mm256_set1_ps(F::kSubnormalStep * 0.5f));
      bits = _mm256_blendv_epi8(bits, _mm256_castps_si256(value), subnormal);
    }
    return _mm256_and_ps(_mm256_mul_ps(_mm256_castsi256_ps(bits), scale),
                         _mm256_castsi256_ps(lanes(count)));
  }
  static Bits zero() { return _mm256_setzero_si256(); }
  static Bits max(Bits current, __m256 x) {
    return _mm256_max_epu32(current, _mm256_and_si256(_mm256_castps_si256(x),
                                                      _mm256_set1_epi32(0x7fffffff)));
  }
  static uint32_t reduce(Bits x) {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
    return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
  }
  static Bits index(uint32_t first) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_add_epi32(_mm256_set1_epi32(int(first)), iota);
  }
  template <bool kSigned>
  static Bits encode(__m256 x, __m256 inv, Bits random) {
    using F = CodeFormat<kSigned>;
    const __m256 smallest = _mm256_set1_ps(F::kSmallestNormal);
    const __m256 magnitude = _mm256_mul_ps(
        kSigned ? _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))) : x, inv);
    const __m256 small = _mm256_cmp_ps(magnitude, smallest, _CMP_LT_OQ);
    const __m256 a = _mm256_add_ps(magnitude, _mm256_and_ps(small, smallest));
    __m256i u = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(a), random), 20);
    u = _mm256_sub_epi32(u, _mm256_set1_epi32(int(F::kOffset >> 20)));
    u = _mm256_sub_epi32(u, _mm256_and_si256(_mm256_castps_si256(small), _mm256_set1_epi32(8)));
    __m256i c = _mm256_min_epu32(u, _mm256_set1_epi32(int(F::kMaxCode)));
    if constexpr (kSigned)
      c = _mm256_or_si256(c, _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(x), 24),
                                              _mm256_set1_epi32(0x80)));
    return c;
  }
  // The lanes (each under 2^16) as 8 uint16.
  static __m128i words(Bits x) {
    return _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  }
  static void store(uint8_t* p, int64_t count, Bits codes) {
    const __m128i w = words(codes);
    const int64_t bytes = _mm_cvtsi128_si64(_mm_packus_epi16(w, w));
    std::memcpy(p, &bytes, static_cast<size_t>(std::min<int64_t>(count, N)));
  }
  static Bits mullo(Bits a, uint32_t c) { return _mm256_mullo_epi32(a, _mm256_set1_epi32(int(c))); }
  static Bits srl(Bits a, int n) { return _mm256_srli_epi32(a, n); }
  static Bits sll(Bits a, int n) { return _mm256_slli_epi32(a, n); }
  static Bits xor_(Bits a, Bits b) { return _mm256_xor_si256(a, b); }
  static Bits or_(Bits a, Bits b) { return _mm256_or_si256(a, b); }
  static Bits and_(Bits a, uint32_t c) { return _mm256_and_si256(a, _mm256_set1_epi32(int(c))); }
  static Bits set1(uint32_t c) { return _mm256_set1_epi32(int(c)); }
  static Bits round_bf16(__m256 x, Bits random) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_srli_epi32(_mm256_blendv_epi8(_mm256_add_epi32(u, random),
                                                _mm256_or_si256(u, set1(0x00400000u)), nan),
                             16);
  }
  static void store_halves(uint16_t* p, Bits halves) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), words(halves));
  }
};
#endif

// hash32 (random.h) of each lane.
inline CodeOps::Bits hash32_lanes(CodeOps::Bits x) {
  using O = CodeOps;
  x = O::xor_(x, O::srl(x, 16));
  x = O::mullo(x, 0x7feb352du);
  x = O::xor_(x, O::srl(x, 15));
  x = O::mullo(x, 0x846ca68bu);
  return O::xor_(x, O::srl(x, 16));
}

// bits(first + j) of a MomentBits (moment_bits32) for the lanes j of a vector (no lane
// crossing a multiple of 2^32: bits.crosses).
inline CodeOps::Bits moment_bits_lanes(const MomentBits& bits, uint32_t first) {
  return hash32_lanes(
      CodeOps::xor_(CodeOps::index(bits.base_lo + first), CodeOps::set1(bits.folded)));
}

#endif

// Float lanes rounded stochastically to bfloat16 (round_bf16_stochastic) lane by lane, with
// the random bits of elements i .. i+count-1 of the param's stream, storing straight into
// `base` but at the end of a range. For bfloat16 params (stochastic_rounding).
template <bool kPartial, int kParts>
inline void store_stochastic(const Lanes<float, kParts>& x, void* base, int64_t i,
                             int64_t count, const RoundingKeys& keys) {
  constexpr int kElems = kParts * Vectorized<float>::size();
  alignas(64) float in[kElems];
  alignas(64) c10::BFloat16 part[kElems];
  c10::BFloat16* out = kPartial ? part : static_cast<c10::BFloat16*>(base) + i;
  for (int k = 0; k < kParts; ++k) x.v[k].store(in + k * Vectorized<float>::size());
  for_each_lane(LaneBits(keys.param, keys.offset + i), kElems,
                [&](int j, uint32_t r) { out[j] = round_bf16_stochastic(in[j], r); });
  if (kPartial) std::memcpy(static_cast<c10::BFloat16*>(base) + i, part, sizeof(part[0]) * count);
}

// Both moments rounded stochastically to bfloat16, with one hash per element
// (moment_bits: its low half for m, its high half for v).
template <bool kPartial, int kParts>
inline void store_stochastic_moments(const Lanes<float, kParts>& m, const Lanes<float, kParts>& v,
                                     void* m_base, void* v_base, int64_t i, int64_t count,
                                     const RoundingKeys& keys) {
  constexpr int N = Vectorized<float>::size();
  constexpr int kElems = kParts * N;
  alignas(64) float m_in[kElems], v_in[kElems];
  alignas(64) c10::BFloat16 m_part[kElems], v_part[kElems];
  c10::BFloat16* m_out = kPartial ? m_part : static_cast<c10::BFloat16*>(m_base) + i;
  c10::BFloat16* v_out = kPartial ? v_part : static_cast<c10::BFloat16*>(v_base) + i;
  const MomentBits bits(keys.moments, keys.offset + i);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // (CodeOps: a vector of lanes at a time, as the generic loop below rounds them)
  if (!bits.crosses(kElems)) [[likely]] {
    using O = CodeOps;
    static_assert(O::N == N, "one vector of floats per vector of hashes");
    for (int k = 0; k < kParts; ++k) {
      const O::Bits r = moment_bits_lanes(bits, uint32_t(k * N));
      O::store_halves(reinterpret_cast<uint16_t*>(m_out) + k * N,
                      O::round_bf16(m.v[k], O::and_(r, 0xffffu)));
      O::store_halves(reinterpret_cast<uint16_t*>(v_out) + k * N,
                      O::round_bf16(v.v[k], O::srl(r, 16)));
    }
  } else
#endif
  {
    for (int k = 0; k < kParts; ++k) {
      m.v[k].store(m_in + k * N);
      v.v[k].store(v_in + k * N);
    }
    for_each_lane(bits, kElems, [&](int j, uint32_t r) {
      m_out[j] = round_bf16_stochastic(m_in[j], moment_random(r, 0));
      v_out[j] = round_bf16_stochastic(v_in[j], moment_random(r, 1));
    });
  }
  if (kPartial) {
    std::memcpy(static_cast<c10::BFloat16*>(m_base) + i, m_part, sizeof(m_part[0]) * count);
    std::memcpy(static_cast<c10::BFloat16*>(v_base) + i, v_part, sizeof(v_part[0]) * count);
  }
}

// Vectors of the compute type per iteration: two beside float16/bfloat16 params (a vector
// of them widens to two) and beside bfloat16 moments (a whole vector of them is loaded and
// stored at once: with half vectors GCC left the bfloat16 rounding loop scalar on AVX2,
// 4.9 ns per element instead of 1.0), else one.
template <class P, class S>
constexpr int kPartsOf = kReducedFloat<P> || std::is_same_v<S, StochasticBf16> ? 2 : 1;

// Loads the param (and its master copy) and grad of one iteration's elements, updates them
// with the moments m, v (and x, amsgrad's max) given in lanes, and stores the param
// (rounded to nearest or stochastically), its master copy and the unscaled grad (unless
// the step keeps the grads: s.store_grad). The
// caller loads and stores the moments in their own storage.
template <class Var, class P, bool kPartial, int kParts>
inline void update_lanes(const TensorPointers& b, int64_t i, int64_t count,
                         const RoundingKeys& keys,
                         const StepScalars<Vectorized<ComputeType<P>>>& s,
                         Lanes<ComputeType<P>, kParts>& m, Lanes<ComputeType<P>, kParts>& v,
                         Lanes<ComputeType<P>, kParts>& x) {
  using C = ComputeType<P>;
  using L = Lanes<C, kParts>;
  L p = load_lanes<C, kParts, P, kPartial>(b.param, i, count);
  if constexpr (Var::master_weights) {
    // The copy, unless the param was written since its last step (master_to_update): its
    // rounding is the store's, round-tripped.
    static_assert(kParts == 2, "master copies are of float16/bfloat16 params");
    const L master = load_lanes<C, kParts, float, kPartial>(b.master_param, i, count);
    const auto [lo, hi] =
        at::vec::convert_to_float<P>(at::vec::convert_from_float<P>(master.v[0], master.v[1]));
    p.v[0] = master_to_update(master.v[0], p.v[0], lo);
    p.v[1] = master_to_update(master.v[1], p.v[1], hi);
  }
  L g = load_lanes<C, kParts, P, kPartial>(b.grad, i, count);
  for (int k = 0; k < kParts; ++k) adam_update<Var>(p.v[k], g.v[k], m.v[k], v.v[k], x.v[k], s);
  if constexpr (Var::stochastic_rounding) {
    store_stochastic<kPartial>(p, b.param, i, count, keys);
  } else {
    store_lanes<P, kPartial>(p, b.param, i, count);
  }
  if constexpr (Var::master_weights) store_lanes<float, kPartial>(p, b.master_param, i, count);
  if constexpr (Var::unscale_grad) {
    if (s.store_grad) store_lanes<P, kPartial>(g, b.grad, i, count);
  }
}

// One iteration's elements (`count` < kElems only at the end of a range, kPartial):
// kPartsOf vectors of the compute type, with moments in S (plain: rounded to
// nearest; StochasticBf16: bfloat16 rounded stochastically).
template <class Var, class P, class S, bool kPartial>
inline void update_vector(const TensorPointers& b, int64_t i, int64_t count,
                          const RoundingKeys& keys,
                          const StepScalars<Vectorized<ComputeType<P>>>& s) {
  using C = ComputeType<P>;
  constexpr int kParts = kPartsOf<P, S>;
  constexpr bool kBf16 = std::is_same_v<S, StochasticBf16>;
  using Stored = MomentStorage<S>;
  using L = Lanes<C, kParts>;
  L m = load_lanes<C, kParts, Stored, kPartial>(b.exp_avg, i, count);
  L v = load_lanes<C, kParts, Stored, kPartial>(b.exp_avg_sq, i, count);
  L x;
  if constexpr (Var::amsgrad) x = load_lanes<C, kParts, S, kPartial>(b.max_exp_avg_sq, i, count);
  update_lanes<Var, P, kPartial>(b, i, count, keys, s, m, v, x);
  if constexpr (kBf16) {
    store_stochastic_moments<kPartial>(m, v, b.exp_avg, b.exp_avg_sq, i, count, keys);
  } else {
    store_lanes<S, kPartial>(m, b.exp_avg, i, count);
    store_lanes<S, kPartial>(v, b.exp_avg_sq, i, count);
    if constexpr (Var::amsgrad) store_lanes<S, kPartial>(x, b.max_exp_avg_sq, i, count);
  }
}

inline float horizontal_absmax(const Vectorized<float>& x) {
  alignas(64) float lanes[Vectorized<float>::size()];
  x.store(lanes);
  float r = 0.0f;
  for (float a : lanes) r = absmax_of(r, a);
  return r;
}

// One block of 8-bit moments (kCodeBlock elements from `start`, or `n` < kCodeBlock at a
// tensor's end), in one pass: its codes decoded into two L1-resident buffers, the update
// run over them vector by vector (storing the param as it goes), the block's new scales
// taken from the new moments' largest magnitudes, the codes encoded back lane by lane.
template <class Var, class P>
void update_code_block(const TensorPointers& b, int64_t start, int64_t n, const RoundingKeys& keys,
                       const StepScalars<Vectorized<float>>& s) {
  constexpr int kParts = kPartsOf<P, Codes8>;
  constexpr int64_t kStep = kParts * Vectorized<float>::size();
  constexpr int64_t N = Vectorized<float>::size();
  using L = Lanes<float, kParts>;
  alignas(64) float mbuf[kCodeBlock], vbuf[kCodeBlock];
  uint8_t* mcodes = static_cast<uint8_t*>(b.exp_avg) + start;
  uint8_t* vcodes = static_cast<uint8_t*>(b.exp_avg_sq) + start;
  float* m_scale = b.code_scales + start / kCodeBlock;
  float* v_scale = m_scale + code_blocks(b.numel);
  const float ms = *m_scale, vs = *v_scale;
  for (int64_t j = 0; j < n; ++j) mbuf[j] = decode_code<true>(mcodes[j], ms);
  for (int64_t j = 0; j < n; ++j) vbuf[j] = decode_code<false>(vcodes[j], vs);
  for (int64_t j = n; j < kCodeBlock; ++j) mbuf[j] = vbuf[j] = 0.0f;

  Vectorized<float> m_max(0.0f), v_max(0.0f);
  auto iteration = [&]<bool kPartial>(int64_t j) {
    L m, v, x;
    for (int k = 0; k < kParts; ++k) {
      m.v[k] = Vectorized<float>::loadu(mbuf + j + k * N);
      v.v[k] = Vectorized<float>::loadu(vbuf + j + k * N);
    }
    update_lanes<Var, P, kPartial>(b, start + j, n - j, keys, s, m, v, x);
    for (int k = 0; k < kParts; ++k) {
      m.v[k].store(mbuf + j + k * N);
      v.v[k].store(vbuf + j + k * N);
      m_max = absmax_of(m_max, m.v[k]);
      v_max = absmax_of(v_max, v.v[k]);
    }
  };
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) iteration.template operator()<false>(j);
  if (j < n) iteration.template operator()<true>(j);

  const CodeScale m_block = code_scale(horizontal_absmax(m_max));
  const CodeScale v_block = code_scale(horizontal_absmax(v_max));
  for_each_lane(MomentBits(keys.moments, keys.offset + start), n, [&](int k, uint32_t r) {
    mcodes[k] = encode_code<true>(mbuf[k], m_block.inv, moment_random(r, 0));
    vcodes[k] = encode_code<false>(vbuf[k], v_block.inv, moment_random(r, 1));
  });
  *m_scale = m_block.scale;
  *v_scale = v_block.scale;
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The same block with SIMD code written for it (AVX-512 and AVX2: CodeOps above): each
// vector of codes is decoded as it is used (no decode pass), the block's largest
// magnitudes are integer maxima of the float bits (a magnitude's bits order as its value),
// and the codes are encoded a vector at a time and packed by narrowing. The same bits as
// update_code_block, which it leaves the rare blocks to: a stored scale that is not finite
// (a block turned NaN), a non-finite new moment (whose NaN the generic maximum picks),
// random bits crossing a multiple of 2^32.
template <class Var, class P>
void update_code_block_simd(const TensorPointers& pointers, int64_t start, int64_t n,
                            const RoundingKeys& keys,
                            const StepScalars<Vectorized<float>>& scalars) {
  // Local copies: the stores through the pointers cannot alias them, so the loops keep
  // the pointers and the flags in registers (read once per block, not once per vector).
  const TensorPointers b = pointers;
  const StepScalars<Vectorized<float>> s = scalars;
  using O = CodeOps;
  constexpr int kParts = kPartsOf<P, Codes8>;
  constexpr int64_t N = O::N;
  constexpr int64_t kStep = kParts * N;
  static_assert(Vectorized<float>::size() == N, "one vector of floats per vector of codes");
  using L = Lanes<float, kParts>;
  uint8_t* mcodes = static_cast<uint8_t*>(b.exp_avg) + start;
  uint8_t* vcodes = static_cast<uint8_t*>(b.exp_avg_sq) + start;
  float* m_scale = b.code_scales + start / kCodeBlock;
  float* v_scale = m_scale + code_blocks(b.numel);
  const MomentBits bits(keys.moments, keys.offset + start);
  if (!(std::isfinite(*m_scale) && std::isfinite(*v_scale)) || bits.crosses(n))
    return update_code_block<Var, P>(b, start, n, keys, s);
  const Vectorized<float> ms(*m_scale), vs(*v_scale);
  alignas(64) float mbuf[kCodeBlock], vbuf[kCodeBlock];

  O::Bits m_max = O::zero(), v_max = O::zero();
  auto iteration = [&]<bool kPartial>(int64_t j) {
    L m, v, x;
    for (int k = 0; k < kParts; ++k) {
      // (lanes past the block's end: zero moments, as update_code_block's buffers hold)
      const int64_t count = kPartial ? std::clamp<int64_t>(n - j - k * N, 0, N) : N;
      m.v[k] = O::decode_m(mcodes + j + k * N, count, ms);
      v.v[k] = O::decode_v(vcodes + j + k * N, count, vs);
    }
    update_lanes<Var, P, kPartial>(b, start + j, n - j, keys, s, m, v, x);
    for (int k = 0; k < kParts; ++k) {
      m.v[k].store(mbuf + j + k * N);
      v.v[k].store(vbuf + j + k * N);
      m_max = O::max(m_max, m.v[k]);
      v_max = O::max(v_max, v.v[k]);
    }
  };
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) iteration.template operator()<false>(j);
  if (j < n) iteration.template operator()<true>(j);
  const int64_t stored = j < n ? j + kStep : j;  // buffer elements the iterations wrote

  // update_code_block's maximum (absmax_of, in its order) where a moment is not finite.
  auto absmax = [&](O::Bits max_bits, const float* buf) {
    const uint32_t top = O::reduce(max_bits);
    if (top < 0x7f800000u) return float_from_bits(top);
    Vectorized<float> acc(0.0f);
    for (int64_t i = 0; i < stored; i += N) acc = absmax_of(acc, Vectorized<float>::loadu(buf + i));
    return horizontal_absmax(acc);
  };
  const CodeScale m_block = code_scale(absmax(m_max, mbuf));
  const CodeScale v_block = code_scale(absmax(v_max, vbuf));
  const Vectorized<float> m_inv(m_block.inv), v_inv(v_block.inv);
  for (int64_t k = 0; k < n; k += N) {
    const O::Bits r = moment_bits_lanes(bits, uint32_t(k));
    // moment_random(r, which) >> 12, of each half h of r: (h << 4) | (h >> 12)
    const O::Bits m_random = O::or_(O::and_(O::sll(r, 4), 0xffff0u), O::and_(O::srl(r, 12), 0xfu));
    const O::Bits v_random = O::or_(O::and_(O::srl(r, 12), 0xffff0u), O::srl(r, 28));
    O::store(mcodes + k, n - k,
             O::encode<true>(Vectorized<float>::loadu(mbuf + k), m_inv, m_random));
    O::store(vcodes + k, n - k,
             O::encode<false>(Vectorized<float>::loadu(vbuf + k), v_inv, v_random));
  }
  *m_scale = m_block.scale;
  *v_scale = v_block.scale;
}
#endif

template <class Var, class P, class S>
void update_range(const TensorPointers& b, int64_t begin, int64_t end,
                  const StepScalars<double>& scalars, const RoundingKeys& streams) {
  using C = ComputeType<P>;
  // Round the scalars to the compute type first, as torch does, then broadcast.
  const auto s = scalars.as<C>().template as<Vectorized<C>>();
  constexpr int64_t kStep = kPartsOf<P, S> * Vectorized<C>::size();
  static_assert(kMaxVectorElems % kStep == 0, "chunks must hold whole vectors");
  static_assert(kCutElems % kCodeBlock == 0, "ranges must hold whole blocks of codes");
  // Local copies of the pointers and keys: the stores through the pointers cannot alias
  // them, so the loop keeps them in registers instead of reloading them after every store.
  const TensorPointers local = b;
  const RoundingKeys keys = streams;
  if constexpr (std::is_same_v<S, Codes8>) {
    for (int64_t i = begin; i < end; i += kCodeBlock) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      update_code_block_simd<Var, P>(local, i, std::min(kCodeBlock, end - i), keys, s);
#else
      update_code_block<Var, P>(local, i, std::min(kCodeBlock, end - i), keys, s);
#endif
    }
  } else {
    int64_t i = begin;
    for (; i + kStep <= end; i += kStep) update_vector<Var, P, S, false>(local, i, kStep, keys, s);
    if (i < end) update_vector<Var, P, S, true>(local, i, end - i, keys, s);
  }
}

}  // namespace CPU_CAPABILITY

RangeKernel ADAMX_ISA_ENTRY(Dtype dtype, StateKind kind, Switches switches) {
  RangeKernel kernel = nullptr;
  dispatch_kernel(dtype, kind, switches,
                  [&]<class Var, class P, class S>() { kernel = &update_range<Var, P, S>; });
  return kernel;
}

}  // namespace cpu
}  // namespace adamx
