// The per-element Adam / AdamW update: the one place where the math lives.
//
// Both kernels call `adam_update`: the CPU kernel with SIMD vector types
// (at::vec::Vectorized<float>, see cpu/adam_cpu_kernel.h) and the CUDA kernel with
// plain float/double. The switches that change the formula are compile-time
// parameters of `Variant`; per-step quantities (bias corrections, step size) are
// computed once per tensor in `StepScalars` and broadcast to the value type.
//
// The formula follows torch's Adam operation for operation, but for one thing: the bias
// correction of v multiplies by a reciprocal computed once per step instead of dividing
// each element (a division is the costliest operation here, and the CPU kernel is
// division-bound on cache-resident tensors; see benchmarks/RESULTS.md). It changes the
// result by at most a rounding.
//   g    = maximize ? -g : g
//   g   += wd * p                         (Adam's L2 penalty, wd != 0)
//   p   *= 1 - lr * wd                    (AdamW's decoupled decay, wd != 0)
//   m    = lerp(m, g, 1 - beta1)
//   v    = fma((1 - beta2) * g, g, v * beta2)
//   vmax = max(vmax, v)                   (amsgrad; vmax replaces v below)
//   den  = sqrt(v) * (1/sqrt(bc2)) + eps  (torch)  |  sqrt(v * (1/bc2) + eps)  (tutorial)
//   p    = p + (-lr / bc1) * m / den
// with bc1 = 1 - beta1^t and bc2 = 1 - beta2^t for the step t after its increment.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ADAMX_HD __host__ __device__ __forceinline__
#else
#define ADAMX_HD inline
#endif

namespace adamx {

// The compile-time switches of the update.
template <bool kDecoupled, bool kAmsgrad, bool kMaximize, bool kEpsInsideSqrt>
struct Variant {
  static constexpr bool decoupled = kDecoupled;          // AdamW decay instead of L2
  static constexpr bool amsgrad = kAmsgrad;
  static constexpr bool maximize = kMaximize;
  static constexpr bool eps_inside_sqrt = kEpsInsideSqrt;  // the tutorial's placement
};

// Hyper-parameters of one step, as the user gave them (double, host or device).
struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
};

// Per-tensor, per-step scalars in the compute type T (float, double, or a SIMD
// vector of them). Built once per tensor per step by `step_scalars`.
template <class T>
struct StepScalars {
  T lerp_coeff;      // m = fma(lerp_coeff, g - m, lerp_from_grad ? g : m)
  T beta2;
  T one_minus_beta2;
  T neg_step_size;   // -lr / bc1
  T inv_bc2_term;    // 1/sqrt(bc2) (torch placement) or 1/bc2 (eps inside the sqrt)
  T eps;
  T weight_decay;    // L2 coefficient (0: no penalty)
  T decay_factor;    // 1 - lr * wd (decoupled decay)
  bool lerp_from_grad;
  bool has_weight_decay;

  // Broadcast to another compute type (e.g. a SIMD vector of T).
  template <class U>
  ADAMX_HD StepScalars<U> as() const {
    return {U(lerp_coeff), U(beta2), U(one_minus_beta2), U(neg_step_size), U(inv_bc2_term),
            U(eps), U(weight_decay), U(decay_factor), lerp_from_grad, has_weight_decay};
  }
};

// Bias corrections and step size for step `step` (already incremented), computed in
// the precision of S (double on the host, as torch does; float on the device for
// capturable steps whose count lives in device memory).
template <class S, bool kEpsInsideSqrt>
ADAMX_HD StepScalars<S> step_scalars(S step, S lr, const Hyper& h) {
  using std::pow;
  using std::sqrt;
  const S beta1 = S(h.beta1), beta2 = S(h.beta2);
  const S bc1 = S(1) - pow(beta1, step);
  const S bc2 = S(1) - pow(beta2, step);
  const S w = S(1) - beta1;  // lerp weight; torch's lerp picks its form by |w| < 0.5
  StepScalars<S> s;
  s.lerp_from_grad = !(w < S(0.5));
  s.lerp_coeff = s.lerp_from_grad ? w - S(1) : w;
  s.beta2 = beta2;
  s.one_minus_beta2 = S(1) - beta2;
  s.neg_step_size = -(lr / bc1);
  s.inv_bc2_term = S(1) / (kEpsInsideSqrt ? bc2 : sqrt(bc2));
  s.eps = S(h.eps);
  s.weight_decay = S(h.weight_decay);
  s.decay_factor = S(1) - lr * S(h.weight_decay);
  s.has_weight_decay = h.weight_decay != 0;
  return s;
}

// sqrt / max / fma for scalar compute types; the CPU kernel specializes this for its
// SIMD vectors. Keeping them in a traits struct lets `adam_update` stay one template.
template <class T>
struct MathOps {
  static ADAMX_HD T sqrt(T x) { using std::sqrt; return sqrt(x); }
  // NaN-propagating, like torch.maximum.
  static ADAMX_HD T max(T a, T b) { return (a != a || b < a) ? a : b; }
  static ADAMX_HD T fma(T a, T b, T c) { using std::fma; return fma(a, b, c); }
};

// One Adam update of one element (or one SIMD vector of elements), in place.
// `vmax` is only read or written when V::amsgrad.
template <class Var, class T>
ADAMX_HD void adam_update(T& p, T g, T& m, T& v, T& vmax, const StepScalars<T>& s) {
  using M = MathOps<T>;
  if (Var::maximize) g = g * T(-1);
  if (s.has_weight_decay) {
    if (Var::decoupled) p = p * s.decay_factor;
    else g = g + p * s.weight_decay;
  }
  // Two calls rather than one with a selected third operand: selecting between two SIMD
  // vectors made GCC spill both to the stack each iteration (1.7x slower).
  m = s.lerp_from_grad ? M::fma(s.lerp_coeff, g - m, g) : M::fma(s.lerp_coeff, g - m, m);
  // One rounding for the add, as torch's CPU addcmul_ (its compiler contracts it into an
  // fma; measured: bitwise equal to fma, 0.3% of elements differ from mul-then-add).
  v = M::fma(s.one_minus_beta2 * g, g, v * s.beta2);
  T second = v;
  if (Var::amsgrad) {
    vmax = M::max(vmax, v);
    second = vmax;
  }
  const T denom = Var::eps_inside_sqrt ? M::sqrt(second * s.inv_bc2_term + s.eps)
                                       : M::sqrt(second) * s.inv_bc2_term + s.eps;
  p = p + s.neg_step_size * m / denom;
}

// Calls f.template operator()<Variant<...>>() with the variant matching the runtime
// switches: the single place where runtime flags become template parameters.
template <class F>
inline void dispatch_variant(bool decoupled, bool amsgrad, bool maximize, bool eps_inside,
                               F&& f) {
#define ADAMX_VARIANT_CASE(D, A, M, E)                                                    \
  if (decoupled == D && amsgrad == A && maximize == M && eps_inside == E) {               \
    f.template operator()<Variant<D, A, M, E>>();                                         \
    return;                                                                               \
  }
#define ADAMX_VARIANT_E(D, A, M) ADAMX_VARIANT_CASE(D, A, M, false) ADAMX_VARIANT_CASE(D, A, M, true)
#define ADAMX_VARIANT_M(D, A) ADAMX_VARIANT_E(D, A, false) ADAMX_VARIANT_E(D, A, true)
#define ADAMX_VARIANT_A(D) ADAMX_VARIANT_M(D, false) ADAMX_VARIANT_M(D, true)
  ADAMX_VARIANT_A(false)
  ADAMX_VARIANT_A(true)
#undef ADAMX_VARIANT_A
#undef ADAMX_VARIANT_M
#undef ADAMX_VARIANT_E
#undef ADAMX_VARIANT_CASE
}

}  // namespace adamx
