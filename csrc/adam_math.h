// The per-element Adam / AdamW update, and the compile-time vocabulary every kernel shares:
// the switches of the formula, the storage dtypes, the per-tensor pointers. The one place
// where the math lives.
//
// Both kernels call `adam_update`: the CPU kernel with SIMD vector types
// (at::vec::Vectorized<float>, see backends/cpu/kernel.cpp) and the CUDA kernel with plain
// float/double. The switches that change the formula are listed once, in ADAMX_SWITCHES;
// from that list come the `Switches` struct, the compile-time `Variant`, the dispatch from
// one to the other, the op's schema and the param-group keys the optimizer reads. Per-step
// quantities (bias corrections, step size) are computed once per tensor in `StepScalars`.
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

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ADAMX_HD __host__ __device__ __forceinline__
#else
#define ADAMX_HD inline
#endif

// The switches of the update, in the order the op's schema lists them. Each is a bool op
// argument and a param-group key of the same name (default False). Adding one here and
// using it in adam_update is all the kernels need: everything else is generated from it.
#define ADAMX_SWITCHES(X) \
  X(amsgrad)              \
  X(maximize)             \
  X(decoupled_weight_decay) /* AdamW's decay instead of an L2 penalty */ \
  X(eps_inside_sqrt)        /* the tutorial's placement of eps */ \
  X(stochastic_rounding)    /* bfloat16 params: round the new param stochastically */

namespace adamx {

// The switches as run-time values, and two more compile-time parameters of the kernels
// that are no arguments of their own, but set by the operands an op call is given:
// `unscale_grad` by a grad_scale (GradScaler), so that an unscaled step has no division
// and no grad store; `master_weights` by master_params (fp32 copies of float16/bfloat16
// params, and fp32 state).
#define ADAMX_OPERAND_SWITCHES(X) \
  X(unscale_grad)                 \
  X(master_weights)

#define ADAMX_ALL_SWITCHES(X) ADAMX_SWITCHES(X) ADAMX_OPERAND_SWITCHES(X)

struct Switches {
#define ADAMX_SWITCH_FIELD(name) bool name = false;
  ADAMX_ALL_SWITCHES(ADAMX_SWITCH_FIELD)
#undef ADAMX_SWITCH_FIELD
};

#define ADAMX_COUNT_SWITCH(name) +1
constexpr unsigned kNumSwitches = 0 ADAMX_SWITCHES(ADAMX_COUNT_SWITCH);
constexpr unsigned kNumAllSwitches = 0 ADAMX_ALL_SWITCHES(ADAMX_COUNT_SWITCH);
#undef ADAMX_COUNT_SWITCH
// Combinations of all switches (not all of them are kernels: see kSupported).
constexpr unsigned kNumVariants = 1u << kNumAllSwitches;

constexpr unsigned switch_bits(const Switches& s) {
  unsigned bits = 0, k = 0;
#define ADAMX_SWITCH_BIT(name) bits |= unsigned(s.name) << k++;
  ADAMX_ALL_SWITCHES(ADAMX_SWITCH_BIT)
#undef ADAMX_SWITCH_BIT
  return bits;
}

constexpr Switches switches_from_bits(unsigned bits) {
  Switches s;
  unsigned k = 0;
#define ADAMX_SWITCH_FROM_BIT(name) s.name = (bits >> k++) & 1u;
  ADAMX_ALL_SWITCHES(ADAMX_SWITCH_FROM_BIT)
#undef ADAMX_SWITCH_FROM_BIT
  return s;
}

// The switches as compile-time constants: Variant<bits>::amsgrad, ... (`on()` returns them
// all by value, so that device code can use them without a static object to refer to:
// nvcc refuses a host variable in device code).
template <unsigned kBits>
struct Variant {
  static ADAMX_HD constexpr Switches on() { return switches_from_bits(kBits); }
#define ADAMX_SWITCH_CONSTANT(name) static constexpr bool name = on().name;
  ADAMX_ALL_SWITCHES(ADAMX_SWITCH_CONSTANT)
#undef ADAMX_SWITCH_CONSTANT
};

// The storage dtypes of params and state.
enum class Dtype : uint8_t { Float32, Float64, Float16, BFloat16 };

template <class T>
constexpr bool kReducedFloat = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// The type the math runs in: float for float/half/bfloat16, double for double (as torch).
template <class T>
using ComputeType = std::conditional_t<std::is_same_v<T, double>, double, float>;

// How a param's moments (exp_avg, exp_avg_sq) are stored. Plain: in the state type S of
// kSupported below (the param's dtype, or float32 beside a master copy), rounded to nearest,
// as torch stores them. The compact kinds store fewer bytes and round stochastically, so
// that small changes are not lost (a bfloat16 v rounded to nearest cannot absorb a relative
// change of 1e-3 and stalls): Bf16 in bfloat16 (for float32 params, or beside a master
// copy); Codes8 as 8-bit codes with a float32 scale per block of kCodeBlock elements (see
// "8-bit codes" below). The kind of a param is read from its state's dtype (operands.cpp).
enum class StateKind : uint8_t { Plain, Bf16, Codes8 };

// The kernels' tag types for the compact kinds (in place of a state type S).
struct StochasticBf16 {};
struct Codes8 {};
template <class S>
constexpr bool kCompact = std::is_same_v<S, StochasticBf16> || std::is_same_v<S, Codes8>;

// The kernels that exist: for params of type P (grads alike) and moments stored as S, a
// variant Var of the switches. S is P, or float with master weights (fp32 state beside
// float16/bfloat16 params), or a compact kind (float32 or bfloat16 params, without
// amsgrad). Stochastic rounding of the param is for bfloat16 params without a master copy.
// The master copy, when there is one, is always float.
template <class Var, class P, class S>
constexpr bool kSupported =
    kCompact<S>
        ? !Var::amsgrad && (std::is_same_v<P, float>
                                ? !Var::master_weights && !Var::stochastic_rounding
                            : std::is_same_v<P, c10::BFloat16>
                                ? !(Var::master_weights && Var::stochastic_rounding) &&
                                      (Var::master_weights || std::is_same_v<S, Codes8>)
                                : false)
    : Var::master_weights
        ? kReducedFloat<P> && std::is_same_v<S, float> && !Var::stochastic_rounding
        : std::is_same_v<P, S> && (!Var::stochastic_rounding || std::is_same_v<P, c10::BFloat16>);

namespace detail {
template <class F, unsigned... kBits>
void dispatch_bits(unsigned bits, F& f, std::integer_sequence<unsigned, kBits...>) {
  ((bits == kBits ? (f.template operator()<Variant<kBits>>(), 0) : 0), ...);
}

// The state type of the kind: P or float for Plain, else the compact tag.
template <class P, StateKind kKind>
using StateOf = std::conditional_t<
    kKind == StateKind::Bf16, StochasticBf16,
    std::conditional_t<kKind == StateKind::Codes8, Codes8,
                       std::conditional_t<kReducedFloat<P>, float, P>>>;

template <class P, StateKind kKind, class F>
void dispatch_variant(Switches s, F& f) {
  using S = StateOf<P, kKind>;
  // Stochastic rounding concerns bfloat16 params only: float32 and float64 params are
  // stored in the type the math runs in (check_args refuses float16 params with it).
  if (!std::is_same_v<P, c10::BFloat16>) s.stochastic_rounding = false;
  auto kernel = [&]<class Var>() {
    if constexpr (kKind == StateKind::Plain && kSupported<Var, P, P>)
      f.template operator()<Var, P, P>();
    else if constexpr (kSupported<Var, P, S>) f.template operator()<Var, P, S>();
  };
  dispatch_bits(switch_bits(s), kernel, std::make_integer_sequence<unsigned, kNumVariants>{});
}

template <class Var, class P>
constexpr unsigned count_kernels() {
  using S = StateOf<P, StateKind::Plain>;
  return unsigned(kSupported<Var, P, P>) +
         unsigned(!std::is_same_v<P, S> && kSupported<Var, P, S>) + unsigned(kSupported<Var, P, StochasticBf16>) + unsigned(kSupported<Var, P, Codes8>);
}
template <class P, unsigned... kBits>
constexpr unsigned count_kernels(std::integer_sequence<unsigned, kBits...>) {
  return (count_kernels<Variant<kBits>, P>() + ...);
}
}  // namespace detail

// Calls f.template operator()<T>() with T the C++ type of `d`.
template <class F>
void dispatch_dtype(Dtype d, F&& f) {
  switch (d) {
    case Dtype::Float64: return f.template operator()<double>();
    case Dtype::Float16: return f.template operator()<c10::Half>();
    case Dtype::BFloat16: return f.template operator()<c10::BFloat16>();
    case Dtype::Float32: return f.template operator()<float>();
  }
}

// Calls f.template operator()<Var, P, S>() with the kernel for params of dtype `param`,
// moments stored as `kind`, and these switches: the single place where run-time dtypes and
// switches become template parameters. (check_args has refused the combinations that are
// no kernel.) dispatch_kernel_of<P> is the same for params of C++ type P (one
// translation unit per dtype: the CUDA kernels compile in parallel).
template <class P, class F>
void dispatch_kernel_of(StateKind kind, const Switches& s, F&& f) {
  switch (kind) {
    case StateKind::Bf16: return detail::dispatch_variant<P, StateKind::Bf16>(s, f);
    case StateKind::Codes8: return detail::dispatch_variant<P, StateKind::Codes8>(s, f);
    case StateKind::Plain: return detail::dispatch_variant<P, StateKind::Plain>(s, f);
  }
}
template <class F>
void dispatch_kernel(Dtype param, StateKind kind, const Switches& s, F&& f) {
  dispatch_dtype(param, [&]<class P>() { dispatch_kernel_of<P>(kind, s, f); });
}

// How many kernels there are (per ISA on the CPU, per architecture in CUDA).
constexpr unsigned kNumKernels = [] {
  constexpr auto all = std::make_integer_sequence<unsigned, kNumVariants>{};
  return detail::count_kernels<float>(all) + detail::count_kernels<double>(all) +
         detail::count_kernels<c10::Half>(all) + detail::count_kernels<c10::BFloat16>(all);
}();

// One tensor's buffers as a kernel sees them: all laid out alike (same sizes and strides,
// non-overlapping and dense), `numel` elements each.
struct TensorPointers {
  void* param;
  void* grad;            // written (the unscaled grad) only when unscale_grad
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // null unless amsgrad
  void* master_param;    // null unless master_weights (then float)
  float* code_scales;    // Codes8: exp_avg's block scales, then exp_avg_sq's; else null
  int64_t numel;
};

// Hyper-parameters of one step, as the user gave them (double, host or device), the grad
// scale when it is read on the host (only read when unscale_grad; the operand layer sets
// it), and the seed of stochastic rounding.
struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
  double grad_scale;
  int64_t seed;
  // With unscale_grad: leave the grads as they are (the step still divides each by
  // grad_scale as it reads it, but does not store the quotient back), a write of every
  // grad saved. The op's keep_grads; runtime, not a switch (no kernel of its own). (No
  // default member initializer: Hyper stays trivial, as LaunchTable's memset needs; an
  // aggregate initializer that leaves it out sets it false.)
  bool keep_grads;
};

// Counter-based random bits for stochastic rounding: a hash of (seed, tensor, step,
// element), the same on every thread, ISA and device. `rounding_key` mixes the first three
// once per tensor and step (splitmix64's finalizer); `rounding_bits` mixes in the
// element's index with two rounds of a 32-bit integer hash (Wellons' "lowbias32"), which
// the CPU kernel vectorizes.
ADAMX_HD uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

ADAMX_HD uint64_t rounding_key(int64_t seed, uint32_t tensor, double step) {
  const uint64_t s = mix64(static_cast<uint64_t>(seed) + 0x9e3779b97f4a7c15ull);
  return mix64(mix64(s ^ tensor) ^ static_cast<uint64_t>(step));
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
// (stochastic_rounding) and its compact moments'.
struct RoundingKeys {
  uint64_t param = 0, moments = 0;
  RoundingKeys() = default;
  ADAMX_HD explicit RoundingKeys(uint64_t key) : param(key), moments(moment_key(key)) {}
};

// How compact moments of kind S are stored: bfloat16 for StochasticBf16, uint8 codes for
// Codes8, S itself for the plain kinds.
template <class S>
using MomentStorage = std::conditional_t<std::is_same_v<S, StochasticBf16>, c10::BFloat16,
                                         std::conditional_t<std::is_same_v<S, Codes8>, uint8_t, S>>;

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

ADAMX_HD float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

ADAMX_HD uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

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
  T grad_scale;      // the divisor of the grad (unscale_grad)
  bool lerp_from_grad;
  bool has_weight_decay;
  bool store_grad;   // unscale_grad: the quotient is stored back (not Hyper::keep_grads)

  // Broadcast to another compute type (e.g. a SIMD vector of T).
  template <class U>
  ADAMX_HD StepScalars<U> as() const {
    return {U(lerp_coeff), U(beta2), U(one_minus_beta2), U(neg_step_size), U(inv_bc2_term),
            U(eps), U(weight_decay), U(decay_factor), U(grad_scale), lerp_from_grad,
            has_weight_decay, store_grad};
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
  if (Var::maximize) g = g * T(-1);
  if (s.has_weight_decay) {
    if (Var::decoupled_weight_decay) p = p * s.decay_factor;
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

}  // namespace adamx
