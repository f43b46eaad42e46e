// The kernels' compile-time vocabulary: the switches of the update (ADAMX_SWITCHES, from
// which come the `Switches` struct, the compile-time `Variant`, the op's schema and the
// param-group keys the optimizer reads), the storage dtypes and state kinds, the kernels
// that exist (`kSupported`) and the one dispatch from run-time values to them.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "portable.h"

// The switches of the update, in the order the op's schema lists them. Each is a bool op
// argument and a param-group key of the same name (default False). Each is either a
// compile-time parameter of the kernels (K: a kernel of its own) or a run-time flag that
// every kernel reads from its step scalars (R: no kernel of its own). A switch is compiled
// in only where a measurement says the flag would cost more than ~2% per element
// (docs/DEVELOPING.md, "Compile-time switches"). Adding one here and using it in
// adam_update (Var::name for K, s.name for R: StepFlags' field and its setting in
// step_scalars are generated) is all the kernels need: everything else is generated from
// it, and the tests run it (conftest.KERNEL_CASES, from _C.KERNEL_CASES).
#define ADAMX_SWITCH_LIST(K, R)                                                       \
  K(amsgrad)                                                                          \
  R(maximize)                                                                         \
  R(decoupled_weight_decay) /* AdamW's decay instead of an L2 penalty */              \
  R(eps_inside_sqrt)        /* the tutorial's placement of eps */                     \
  K(stochastic_rounding)    /* bfloat16 params: round the new param stochastically */
#define ADAMX_SKIP_SWITCH(name)
#define ADAMX_SWITCHES(X) ADAMX_SWITCH_LIST(X, X)

namespace adamx {

// Two more compile-time parameters of the kernels that are no arguments of their own, but
// set by the operands an op call is given: `unscale_grad` by a grad_scale (GradScaler), so
// that an unscaled step has no division and no grad store; `master_weights` by
// master_params (fp32 copies of float16/bfloat16 params, and fp32 state).
#define ADAMX_OPERAND_SWITCHES(X) \
  X(unscale_grad)                 \
  X(master_weights)

#define ADAMX_ALL_SWITCHES(X) ADAMX_SWITCHES(X) ADAMX_OPERAND_SWITCHES(X)
// The kernels' template parameters: the K switches and the operand switches.
#define ADAMX_KERNEL_SWITCHES(X) ADAMX_SWITCH_LIST(X, ADAMX_SKIP_SWITCH) ADAMX_OPERAND_SWITCHES(X)

// All switches as run-time values. No default member initializers, so that it stays
// trivial (CUDA launch tables hold one and are cleared with memset): write `Switches s{}`.
struct Switches {
#define ADAMX_SWITCH_FIELD(name) bool name;
  ADAMX_ALL_SWITCHES(ADAMX_SWITCH_FIELD)
#undef ADAMX_SWITCH_FIELD
};

#define ADAMX_COUNT_SWITCH(name) +1
constexpr unsigned kNumKernelSwitches = 0 ADAMX_KERNEL_SWITCHES(ADAMX_COUNT_SWITCH);
#undef ADAMX_COUNT_SWITCH
// Combinations of the kernel switches (not all of them are kernels: see kSupported).
constexpr unsigned kNumVariants = 1u << kNumKernelSwitches;

// The kernel switches as bits (the run-time ones are left out).
constexpr unsigned switch_bits(const Switches& s) {
  unsigned bits = 0, k = 0;
#define ADAMX_SWITCH_BIT(name) bits |= unsigned(s.name) << k++;
  ADAMX_KERNEL_SWITCHES(ADAMX_SWITCH_BIT)
#undef ADAMX_SWITCH_BIT
  return bits;
}

// The switches of kernel bits `bits` (the run-time ones false).
constexpr Switches switches_from_bits(unsigned bits) {
  Switches s{};
  unsigned k = 0;
#define ADAMX_SWITCH_FROM_BIT(name) s.name = (bits >> k++) & 1u;
  ADAMX_KERNEL_SWITCHES(ADAMX_SWITCH_FROM_BIT)
#undef ADAMX_SWITCH_FROM_BIT
  return s;
}

// The kernel switches as compile-time constants: Variant<bits>::amsgrad, ... (`on()` returns them
// all by value, so that device code can use them without a static object to refer to:
// nvcc refuses a host variable in device code).
template <unsigned kBits>
struct Variant {
  static ADAMX_HD constexpr Switches on() { return switches_from_bits(kBits); }
#define ADAMX_SWITCH_CONSTANT(name) static constexpr bool name = on().name;
  ADAMX_KERNEL_SWITCHES(ADAMX_SWITCH_CONSTANT)
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
// math/codes8.h). The kind of a param is read from its state's dtype (operands.cpp).
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

// Calls f(param dtype, state kind, switches) once for every kernel that exists, the
// switches those of the kernel (the run-time ones false): what the tests enumerate, so that
// a new switch, dtype or kind is tested without editing them (_C.KERNEL_CASES).
template <class F>
void for_each_kernel(F&& f) {
  for (Dtype d : {Dtype::Float32, Dtype::Float64, Dtype::Float16, Dtype::BFloat16})
    for (StateKind kind : {StateKind::Plain, StateKind::Bf16, StateKind::Codes8})
      for (unsigned bits = 0; bits < kNumVariants; ++bits)
        dispatch_kernel(d, kind, switches_from_bits(bits), [&]<class Var, class P, class S>() {
          // (the dispatch maps stochastic_rounding of non-bfloat16 params to the kernel
          // without it: count that kernel once)
          if (switch_bits(Var::on()) == bits) f(d, kind, Var::on());
        });
}

// How compact moments of kind S are stored: bfloat16 for StochasticBf16, uint8 codes for
// Codes8, S itself for the plain kinds.
template <class S>
using MomentStorage = std::conditional_t<std::is_same_v<S, StochasticBf16>, c10::BFloat16,
                                         std::conditional_t<std::is_same_v<S, Codes8>, uint8_t, S>>;

}  // namespace adamx
