// The per-element Adam / AdamW update: the one place where the math lives. Its neighbours
// in csrc/math/: switches.h (which kernels exist and the dispatch to them), pointers.h (what
// a kernel is given), random.h (the bits of stochastic rounding), codes8.h (8-bit moments).
//
// Both kernels call `adam_update`: the CPU kernel with SIMD vector types
// (at::vec::Vectorized<float>, see backends/cpu/kernel.cpp) and the CUDA kernel with plain
// float/double. Per-step quantities (bias corrections, step size) are computed once per
// tensor in `StepScalars`.
//
// A GradScaler'd step first divides the grad by the scale (`unscale_grad`, below) and
// writes the quotient back to the grad, as torch's fused Adam does.
//
// How the new param is stored is the kernels' other compile-time choice (their stores
// follow these switches): rounded to nearest in the param's dtype (as torch), rounded
// stochastically (bfloat16 params, `stochastic_rounding`: the random bits come from
// `rounding_bits`, a hash of (seed, tensor, step, element), so results do not depend on
// threads, ISA or device), or, with an fp32 master copy (`master_weights`), the update runs
// on the master copy, which is stored, and the param gets its rounding to nearest (a param
// written since, which is not that rounding any more, restarts its copy: master_to_update).
//
// The formula follows torch's Adam operation for operation, but for one thing: the bias
// correction of v multiplies by a reciprocal computed once per step instead of dividing
// each element (a division is the costliest operation here, and the CPU kernel is
// division-bound on cache-resident tensors; see benchmarks/HISTORY.md). It changes the
// result by at most a rounding.
//   g    = g / grad_scale                 (unscale_grad; g is stored back unless keep_grads)
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

#include "pointers.h"
#include "portable.h"
#include "switches.h"

namespace adamx {

// The flags of a step: uniform across a kernel's elements, the same for every compute type.
struct StepFlags {
  bool lerp_from_grad;    // m = fma(lerp_coeff, g - m, lerp_from_grad ? g : m)
  bool has_weight_decay;
  bool store_grad;        // unscale_grad: the quotient is stored back (not Hyper::keep_grads)
  // The run-time switches (ADAMX_SWITCH_LIST's R), generated from the list.
#define ADAMX_RUNTIME_SWITCH_FIELD(name) bool name;
  ADAMX_SWITCH_LIST(ADAMX_SKIP_SWITCH, ADAMX_RUNTIME_SWITCH_FIELD)
#undef ADAMX_RUNTIME_SWITCH_FIELD
};

// The values of a step, in the compute type.
#define ADAMX_STEP_VALUES(X)                                                               \
  X(lerp_coeff)                                                                            \
  X(beta2)                                                                                 \
  X(one_minus_beta2)                                                                       \
  X(neg_step_size)   /* -lr / bc1 */                                                       \
  X(inv_bc2_term)    /* 1/sqrt(bc2) (torch placement) or 1/bc2 (eps inside the sqrt) */    \
  X(eps)                                                                                   \
  X(weight_decay)    /* L2 coefficient (0: no penalty) */                                  \
  X(decay_factor)    /* 1 - lr * wd (decoupled decay) */                                   \
  X(grad_scale)      /* the divisor of the grad (unscale_grad) */

// Per-tensor, per-step scalars in the compute type T (float, double, or a SIMD vector of
// them), and the step's flags. Built once per tensor per step by `step_scalars`.
template <class T>
struct StepScalars : StepFlags {
#define ADAMX_STEP_VALUE_FIELD(name) T name;
  ADAMX_STEP_VALUES(ADAMX_STEP_VALUE_FIELD)
#undef ADAMX_STEP_VALUE_FIELD

  // Broadcast to another compute type (e.g. a SIMD vector of T); the flags are copied.
  template <class U>
  ADAMX_HD StepScalars<U> as() const {
    StepScalars<U> r;
    static_cast<StepFlags&>(r) = *this;
#define ADAMX_STEP_VALUE_AS(name) r.name = U(name);
    ADAMX_STEP_VALUES(ADAMX_STEP_VALUE_AS)
#undef ADAMX_STEP_VALUE_AS
    return r;
  }
};

// Bias corrections and step size for step `step` (already incremented), in double, on the
// host or in a kernel that reads the step count from memory (capturable steps).
ADAMX_HD StepScalars<double> step_scalars(double step, double lr, const Hyper& h,
                                          Switches on) {
  using std::pow;
  using std::sqrt;
  const double bc1 = 1.0 - pow(h.beta1, step);
  const double bc2 = 1.0 - pow(h.beta2, step);
  const double w = 1.0 - h.beta1;  // lerp weight; torch's lerp picks its form by |w| < 0.5
  StepScalars<double> s;
  s.lerp_from_grad = !(w < 0.5);
  s.lerp_coeff = s.lerp_from_grad ? w - 1.0 : w;
  s.beta2 = h.beta2;
  s.one_minus_beta2 = 1.0 - h.beta2;
  s.neg_step_size = -(lr / bc1);
  s.inv_bc2_term = 1.0 / (on.eps_inside_sqrt ? bc2 : sqrt(bc2));
  s.eps = h.eps;
  s.weight_decay = h.weight_decay;
  s.decay_factor = 1.0 - lr * h.weight_decay;
  s.grad_scale = h.grad_scale;
  s.has_weight_decay = h.weight_decay != 0;
  s.store_grad = on.unscale_grad && !h.keep_grads;
#define ADAMX_RUNTIME_SWITCH_SET(name) s.name = on.name;
  ADAMX_SWITCH_LIST(ADAMX_SKIP_SWITCH, ADAMX_RUNTIME_SWITCH_SET)
#undef ADAMX_RUNTIME_SWITCH_SET
  return s;
}

// sqrt / max / fma for scalar compute types; the CPU kernel specializes this for its
// SIMD vectors. Keeping them in a traits struct lets `adam_update` stay one template.
template <class T>
struct MathOps {
  static ADAMX_HD T sqrt(T x) { using std::sqrt; return sqrt(x); }
  static ADAMX_HD T abs(T x) { using std::fabs; return fabs(x); }
  // NaN-propagating, like torch.maximum; a NaN result is `a` if `a` is NaN, else `b`
  // (the SIMD versions pick the same operand, so NaN payloads agree across kernels).
  static ADAMX_HD T max(T a, T b) { return (a != a || b < a) ? a : b; }
  static ADAMX_HD T fma(T a, T b, T c) { using std::fma; return fma(a, b, c); }
  // Whether a and b hold the same value: the same bits, or both NaN (any payloads).
  static ADAMX_HD bool same_value(T a, T b) {
    static_assert(sizeof(T) == sizeof(float), "float lanes (master copies) only");
    return bits_of(a) == bits_of(b) || (a != a && b != b);
  }
  static ADAMX_HD T select(bool c, T a, T b) { return c ? a : b; }
};

// The largest magnitude so far, NaN-propagating (a NaN wins over everything): MathOps'
// max of the new magnitude and the current one, for scalars (the CUDA body) and SIMD
// vectors (the CPU kernel) alike.
template <class T>
ADAMX_HD T absmax_of(const T& current, const T& x) {
  return MathOps<T>::max(MathOps<T>::abs(x), current);
}

// The value a master copy's update starts from (master_weights), given its param widened
// and `rounded`, the copy's rounding to nearest in the param's type (widened back; each
// kernel rounds as it stores params). The param is the truth: users, checkpoint loaders and
// EMA code write params, never master copies, and a param that is not its copy's rounding
// any more was written since the copy's last step. The copy then restarts from the param
// (exact); where the param still is the rounding, the copy is kept, bits below the param's
// included, so an untouched param steps as before, bit for bit. The comparison is bitwise,
// so that a zero's sign written into the param counts, but for NaNs: a NaN param beside a
// NaN copy counts as unchanged and the copy is kept (NaN payloads do not survive every
// rounding alike, and a NaN restarted from a NaN would be no better). A compare and a
// select in the pass the update makes anyway; the param's load is the cost (2 bytes per
// element where the update read only the copy).
template <class T>
ADAMX_HD T master_to_update(const T& master, const T& param, const T& rounded) {
  using M = MathOps<T>;
  return M::select(M::same_value(param, rounded), master, param);
}

// The same for one element: a float master copy and its param of type P.
template <class P>
ADAMX_HD float master_to_update(float master, P param) {
  return master_to_update(master, static_cast<float>(param),
                          static_cast<float>(static_cast<P>(master)));
}

// One Adam update of one element (or one SIMD vector of elements), in place.
// `vmax` is only read or written when Var::amsgrad; `grad` only written when
// Var::unscale_grad (the caller then stores it back if s.store_grad).
template <class Var, class T>
ADAMX_HD void adam_update(T& p, T& grad, T& m, T& v, T& vmax, const StepScalars<T>& s) {
  using M = MathOps<T>;
  // GradScaler's unscale: a division (as torch's, not a multiplication by the inverse),
  // before maximize and weight decay.
  if (Var::unscale_grad) grad = grad / s.grad_scale;
  T g = grad;
  if (s.maximize) g = g * T(-1);
  if (s.has_weight_decay) {
    if (s.decoupled_weight_decay) p = p * s.decay_factor;
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
  const T denom = s.eps_inside_sqrt ? M::sqrt(second * s.inv_bc2_term + s.eps)
                                    : M::sqrt(second) * s.inv_bc2_term + s.eps;
  p = p + s.neg_step_size * m / denom;
}

}  // namespace adamx
