// The CPU Adam kernel for one instruction set. setup.py compiles this file once per
// ISA, with that ISA's compiler flags and CPU_CAPABILITY set, so that ATen's
// Vectorized<T> is 512, 256 or 128 bits wide; adam_cpu.cpp picks one at run time.
// Everything here lives in a namespace named after the ISA, so the copies never clash.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

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
  // NaN-propagating, picking the operand the scalar MathOps::max picks (at::vec::maximum
  // would return an all-ones NaN instead), so NaN payloads agree across ISAs and the CUDA
  // kernel body.
  static V max(const V& a, const V& b) { return V::blendv(b, a, (a != a) | (b < a)); }
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
constexpr bool kReduced = !std::is_same_v<T, ComputeType<T>>;

// Loads, updates and stores one vector of the storage type (`count` < a full vector
// only at the end of a range). Reduced precision is widened to two float vectors.
template <class Var, class T, bool kPartial>
inline void update_vector(const TensorPointers& b, int64_t i, int64_t count,
                          const StepScalars<Vectorized<ComputeType<T>>>& s) {
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
    if (Var::unscale_grad) g = at::vec::convert_from_float<T>(g0, g1);
    m = at::vec::convert_from_float<T>(m0, m1);
    v = at::vec::convert_from_float<T>(v0, v1);
    vmax = at::vec::convert_from_float<T>(x0, x1);
  } else {
    adam_update<Var>(p, g, m, v, vmax, s);
  }
  store(p, b.param);
  if (Var::unscale_grad) store(g, b.grad);
  store(m, b.exp_avg);
  store(v, b.exp_avg_sq);
  if (Var::amsgrad) store(vmax, b.max_exp_avg_sq);
}

template <class Var, class T>
void update_range(const TensorPointers& b, int64_t begin, int64_t end,
                  const StepScalars<double>& scalars) {
  using Compute = ComputeType<T>;
  // Round the scalars to the compute type first, as torch does, then broadcast.
  const auto s = scalars.as<Compute>().template as<Vectorized<Compute>>();
  constexpr int64_t kStep = Vectorized<T>::size();
  static_assert(kMaxVectorElems % kStep == 0, "chunks must hold whole vectors");
  // A local copy of the pointers: the stores through them cannot alias it, so the loop
  // keeps them in registers instead of reloading them from `b` after every store.
  const TensorPointers local = b;
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) update_vector<Var, T, false>(local, i, kStep, s);
  if (i < end) update_vector<Var, T, true>(local, i, end - i, s);
}

}  // namespace CPU_CAPABILITY

RangeKernel ADAMX_ISA_ENTRY(Dtype dtype, Switches switches) {
  RangeKernel kernel = nullptr;
  dispatch_dtype(dtype, [&]<class T>() {
    dispatch_switches(switches, [&]<class Var>() { kernel = &update_range<Var, T>; });
  });
  return kernel;
}

}  // namespace cpu
}  // namespace adamx
