// The CPU Adam kernel for one instruction set. setup.py compiles this file once per
// ISA, with that ISA's compiler flags and CPU_CAPABILITY set, so that ATen's
// Vectorized<T> is 512, 256 or 128 bits wide; adam_cpu.cpp picks one at run time.
// Everything here lives in a namespace named after the ISA, so the copies never clash.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "adam_cpu.h"

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
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }  // NaN-propagating
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

template <class T>
constexpr bool kReduced = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// Loads, updates and stores one vector of the storage type (`count` < a full vector
// only at the end of a range). Reduced precision is widened to two float vectors.
template <class Var, class T, bool kPartial>
inline void update_vector(const Buffers& b, int64_t i, int64_t count,
                          const StepScalars<Vectorized<std::conditional_t<kReduced<T>, float, T>>>& s) {
  using V = Vectorized<T>;
  auto load = [&](const void* base) {
    const T* ptr = static_cast<const T*>(base) + i;
    return kPartial ? V::loadu(ptr, count) : V::loadu(ptr);
  };
  auto store = [&](const V& x, void* base) {
    T* ptr = static_cast<T*>(base) + i;
    if (kPartial) x.store(ptr, count);
    else x.store(ptr);
  };
  V p = load(b.param), g = load(b.grad), m = load(b.exp_avg), v = load(b.exp_avg_sq);
  V vmax = Var::amsgrad ? load(b.max_exp_avg_sq) : V();
  if constexpr (kReduced<T>) {
    auto [p0, p1] = at::vec::convert_to_float<T>(p);
    auto [g0, g1] = at::vec::convert_to_float<T>(g);
    auto [m0, m1] = at::vec::convert_to_float<T>(m);
    auto [v0, v1] = at::vec::convert_to_float<T>(v);
    auto [x0, x1] = at::vec::convert_to_float<T>(vmax);
    adam_update<Var>(p0, g0, m0, v0, x0, s);
    adam_update<Var>(p1, g1, m1, v1, x1, s);
    p = at::vec::convert_from_float<T>(p0, p1);
    m = at::vec::convert_from_float<T>(m0, m1);
    v = at::vec::convert_from_float<T>(v0, v1);
    vmax = at::vec::convert_from_float<T>(x0, x1);
  } else {
    adam_update<Var>(p, g, m, v, vmax, s);
  }
  store(p, b.param);
  store(m, b.exp_avg);
  store(v, b.exp_avg_sq);
  if (Var::amsgrad) store(vmax, b.max_exp_avg_sq);
}

template <class Var, class T>
void update_range(const Buffers& b, int64_t begin, int64_t end, const StepScalars<double>& s64) {
  using Compute = std::conditional_t<kReduced<T>, float, T>;
  // Round the scalars to the compute type first, as torch does, then broadcast.
  const auto s = s64.as<Compute>().template as<Vectorized<Compute>>();
  constexpr int64_t kStep = Vectorized<T>::size();
  static_assert(kMaxVectorElems % kStep == 0, "chunks must hold whole vectors");
  // A local copy of the pointers: the stores through them cannot alias it, so the loop
  // keeps them in registers instead of reloading them from `b` after every store.
  const Buffers local = b;
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) update_vector<Var, T, false>(local, i, kStep, s);
  if (i < end) update_vector<Var, T, true>(local, i, end - i, s);
}

template <class T>
RangeKernel select(Flags f) {
  RangeKernel k = nullptr;
  dispatch_variant(f.decoupled, f.amsgrad, f.maximize, f.eps_inside_sqrt,
                   [&]<class Var>() { k = &update_range<Var, T>; });
  return k;
}

}  // namespace CPU_CAPABILITY

RangeKernel ADAMX_ISA_ENTRY(Dtype dtype, Flags flags) {
  switch (dtype) {
    case Dtype::Float: return select<float>(flags);
    case Dtype::Double: return select<double>(flags);
    case Dtype::Half: return select<c10::Half>(flags);
    case Dtype::BFloat16: return select<c10::BFloat16>(flags);
  }
  return nullptr;
}

}  // namespace cpu
}  // namespace adamx
