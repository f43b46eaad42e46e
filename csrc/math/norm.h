// The gradient norm's per-element math (adamx::norm_accumulate), shared by the CPU kernel,
// the CUDA body and its CPU emulation.
//
// A norm of order p accumulates, in double, the sum of |x|^p over the elements (order 1,
// 2 or any finite p > 0), or their largest |x| (order inf); the root (sqrt, ^(1/p)) is
// taken once, over the whole sum, by the caller. Each float32, float16 or bfloat16
// element squares exactly in double (24-bit significands, a 48-bit product), so the
// order-2 sum of a float32 tensor is exact but for the sum's own rounding, about 2^-53
// per addition: far below the float32 result's half ulp.
//
// NaN propagates in every order (a NaN term makes the sum NaN; the largest |x| of a
// tensor that holds a NaN is NaN), as torch's norms propagate it.
#pragma once

#include <cmath>
#include <cstdint>

#include "portable.h"

namespace adamx {

enum class NormOrder : uint8_t { One, Two, Inf, P };

// The order adamx's norm kernel takes for torch's norm_type; false for the orders it
// leaves to torch (0, -inf, negative or NaN p).
inline bool norm_order_of(double p, NormOrder* order) {
  if (p == 1.0) *order = NormOrder::One;
  else if (p == 2.0) *order = NormOrder::Two;
  else if (std::isinf(p) && p > 0) *order = NormOrder::Inf;
  else if (p > 0 && std::isfinite(p)) *order = NormOrder::P;
  else return false;
  return true;
}

// Adds element x (widened to double) to the accumulator `acc` of a norm of this order.
// Order 2 is a fused multiply-add (for float64 elements x * x is not exact); order p uses
// pow, whose last bit may differ between the CUDA and C libraries.
ADAMX_HD double norm_add(NormOrder order, double p, double acc, double x) {
  const double a = std::fabs(x);
  switch (order) {
    case NormOrder::One: return acc + a;
    case NormOrder::Two: return std::fma(x, x, acc);
    case NormOrder::Inf: return (a > acc || a != a) ? a : acc;  // NaN sticks
    case NormOrder::P: break;
  }
  return acc + std::pow(a, p);
}

// Joins two accumulators (of parts of the elements) of a norm of this order.
ADAMX_HD double norm_join(NormOrder order, double a, double b) {
  if (order != NormOrder::Inf) return a + b;
  return (b > a || b != b) ? b : a;  // a NaN in either sticks
}

}  // namespace adamx
