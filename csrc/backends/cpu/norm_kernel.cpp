// The CPU norm kernel (adamx::norm_accumulate) for one instruction set, compiled once per
// ISA like kernel.cpp: the accumulator of a norm over a range of one tensor's elements
// (csrc/math/norm.h), widened to double and accumulated in four vectors of doubles, which
// are then joined lane by lane in a fixed order. Order p (pow) and the elements past the
// last whole vector run the shared scalar norm_add.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "norm_kernel.h"

#if defined(CPU_CAPABILITY_AVX512)
#define ADAMX_NORM_ENTRY norm_kernel_avx512
#elif defined(CPU_CAPABILITY_AVX2)
#define ADAMX_NORM_ENTRY norm_kernel_avx2
#else
#define ADAMX_NORM_ENTRY norm_kernel_default
#endif

namespace adamx::cpu {
inline namespace CPU_CAPABILITY {
namespace {

#if defined(CPU_CAPABILITY_AVX512)
// Eight doubles: loads widen float32 (and float16/bfloat16 through float32) exactly.
struct Doubles {
  using V = __m512d;
  static constexpr int kLanes = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const double* x) { return _mm512_loadu_pd(x); }
  static V load(const float* x) { return _mm512_cvtps_pd(_mm256_loadu_ps(x)); }
  static V load(const c10::Half* x) {
    return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))));
  }
  static V load(const c10::BFloat16* x) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
    return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  static V abs(V x) { return _mm512_abs_pd(x); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  // norm_join for order inf: b where b > a or b is NaN, else a (a NaN in a sticks).
  static V max_sticky(V a, V b) {
    const __mmask8 take = _mm512_cmp_pd_mask(b, a, _CMP_GT_OQ) | _mm512_cmp_pd_mask(b, b, _CMP_UNORD_Q);
    return _mm512_mask_blend_pd(take, a, b);
  }
  static void store(double* out, V x) { _mm512_storeu_pd(out, x); }
};
#elif defined(CPU_CAPABILITY_AVX2)
// Four doubles.
struct Doubles {
  using V = __m256d;
  static constexpr int kLanes = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* x) { return _mm256_loadu_pd(x); }
  static V load(const float* x) { return _mm256_cvtps_pd(_mm_loadu_ps(x)); }
  static V load(const c10::Half* x) {
    return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x))));
  }
  static V load(const c10::BFloat16* x) {
    const __m128i w = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x)));
    return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(w, 16)));
  }
  static V abs(V x) { return _mm256_andnot_pd(_mm256_set1_pd(-0.0), x); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V max_sticky(V a, V b) {
    const V take = _mm256_or_pd(_mm256_cmp_pd(b, a, _CMP_GT_OQ), _mm256_cmp_pd(b, b, _CMP_UNORD_Q));
    return _mm256_blendv_pd(a, b, take);
  }
  static void store(double* out, V x) { _mm256_storeu_pd(out, x); }
};
#endif

// Elements [begin, end) added to `acc` one at a time (float16/bfloat16 widen exactly
// through float32).
template <NormOrder O, class T>
double scalar_range(const T* x, int64_t begin, int64_t end, double p, double acc) {
  for (int64_t i = begin; i < end; ++i) {
    if constexpr (std::is_same_v<T, double>) acc = norm_add(O, p, acc, x[i]);
    else acc = norm_add(O, p, acc, double(float(x[i])));
  }
  return acc;
}

template <NormOrder O, class T>
double norm_range(const void* data, int64_t begin, int64_t end, double p) {
  const T* x = static_cast<const T*>(data);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (O != NormOrder::P) {
    using D = Doubles;
    constexpr int L = D::kLanes;
    typename D::V acc[4] = {D::zero(), D::zero(), D::zero(), D::zero()};
    auto add = [](typename D::V a, typename D::V v) {
      if constexpr (O == NormOrder::Two) return D::fma(v, v, a);
      else if constexpr (O == NormOrder::One) return D::add(a, D::abs(v));
      else return D::max_sticky(a, D::abs(v));
    };
    int64_t i = begin;
    for (; i + 4 * L <= end; i += 4 * L)
      for (int k = 0; k < 4; ++k) acc[k] = add(acc[k], D::load(x + i + k * L));
    for (; i + L <= end; i += L) acc[0] = add(acc[0], D::load(x + i));
    alignas(64) double lanes[4][L];
    for (int k = 0; k < 4; ++k) D::store(lanes[k], acc[k]);
    double total = 0.0;
    for (int k = 0; k < 4; ++k)
      for (int j = 0; j < L; ++j) total = norm_join(O, total, lanes[k][j]);
    return scalar_range<O, T>(x, i, end, p, total);
  }
#endif
  return scalar_range<O, T>(x, begin, end, p, 0.0);
}

}  // namespace
}  // namespace CPU_CAPABILITY

NormRangeKernel ADAMX_NORM_ENTRY(Dtype dtype, NormOrder order) {
  NormRangeKernel kernel = nullptr;
  dispatch_dtype(dtype, [&]<class T>() {
    switch (order) {
      case NormOrder::One: kernel = &norm_range<NormOrder::One, T>; break;
      case NormOrder::Two: kernel = &norm_range<NormOrder::Two, T>; break;
      case NormOrder::Inf: kernel = &norm_range<NormOrder::Inf, T>; break;
      case NormOrder::P: kernel = &norm_range<NormOrder::P, T>; break;
    }
  });
  return kernel;
}

}  // namespace adamx::cpu
