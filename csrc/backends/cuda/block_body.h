// The multi-tensor CUDA Adam kernel's launch table and kernel body.
//
// Everything here is __host__ __device__ (ADAMX_HD) plain C++: no CUDA header, no ATen.
// The __global__ kernel (kernel.cu) only forwards blockIdx/threadIdx/blockDim
// to `adam_block_body`; the CPU emulation (emulate.cpp) calls the very same function for
// every (block, thread) of every launch, so the tests run this exact code without a GPU.
//
// One launch updates up to kMaxTensors tensors of one kernel (param dtype and switches),
// in up to kMaxBlocks blocks;
// each block owns one chunk (`chunk_size` elements) of one tensor. The table is passed by
// value as the kernel's argument (it fits in the 4 KiB every CUDA version accepts).
// Threads of a block share nothing: each thread updates the elements
//   chunk_start + thread * W + k * block_dim * W  (+ 0..W-1)
// with W-element loads and stores (16 bytes for the widest operand) when the block's
// pointers allow it, and one element at a time otherwise. All sizes and offsets are 64-bit.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../../adam_math.h"

#if defined(__CUDACC__)
#define ADAMX_UNROLL _Pragma("unroll")
#else
#define ADAMX_UNROLL _Pragma("GCC unroll 16")
#endif

namespace adamx::cuda {

// Capacity of one launch table. sizeof(LaunchTable) stays below the 4 KiB kernel
// parameter limit (static_assert below).
constexpr int kMaxTensors = 32;
constexpr int kMaxBlocks = 256;
constexpr int kMaxScalarSets = 2;

// Defaults of the CUDA launch (the emulation may override them for tests).
constexpr int64_t kDefaultChunkSize = 65536;  // elements per block
constexpr int kBlockDim = 512;                // threads per block
constexpr int kVectorBytes = 16;

// Where a tensor's step scalars come from.
enum StepSource : uint8_t {
  kHostScalars = 0,  // precomputed on the host: sets[scalar_set[t]]
  kStepFloat = 1,    // read *(const float*)step[t].ptr in the kernel (capturable)
  kStepDouble = 2,   // read *(const double*)step[t].ptr in the kernel
  kStepValue = 3,    // step[t].value, with a device lr (computed in the kernel)
};

// A per-step scalar in device memory (null: none, or read on the host).
struct ScalarRef {
  const void* ptr;
  Dtype dtype;
};

union StepRef {
  const void* ptr;  // kStepFloat / kStepDouble: the step count (already incremented)
  double value;     // kHostScalars / kStepValue: the step count
};

struct LaunchTable {
  // Per tensor (index < num_tensors).
  TensorPointers tensors[kMaxTensors];
  StepRef step[kMaxTensors];
  uint32_t tensor_index[kMaxTensors];  // its position in the op's lists (rounding_key)
  // Per launch.
  StepScalars<double> sets[kMaxScalarSets];  // host-computed scalars (kHostScalars)
  Hyper hyper;                               // for scalars computed in the kernel
  const void* lr_ptr;                        // a tensor lr in device memory, or null
  ScalarRef grad_scale;                      // read by the kernel (else hyper.grad_scale)
  ScalarRef found_inf;                       // non-zero: every block returns at entry
  int64_t chunk_size;
  int32_t num_tensors;
  int32_t num_blocks;
  // Per block (index < num_blocks): which tensor, which chunk of it.
  int32_t block_chunk[kMaxBlocks];
  uint8_t block_tensor[kMaxBlocks];
  // Per tensor, small.
  uint8_t step_source[kMaxTensors];
  uint8_t scalar_set[kMaxTensors];
  Dtype lr_dtype;
};

static_assert(sizeof(LaunchTable) <= 4000, "the launch table must fit in 4 KiB of kernel parameters");
static_assert(kMaxTensors <= 256 && kMaxScalarSets <= 256, "uint8_t indices");
static_assert(std::is_trivially_copyable_v<LaunchTable>, "passed by value to a kernel");

// Elements per vector step: 16 bytes of the widest of the param and state types.
template <class P, class S>
constexpr int kVecElems = kVectorBytes / (sizeof(P) > sizeof(S) ? sizeof(P) : sizeof(S));

template <class T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <class P>
ADAMX_HD P load_pack(const void* ptr) {
#if defined(__CUDA_ARCH__)
  return *static_cast<const P*>(ptr);  // one vector load
#else
  P x;
  std::memcpy(&x, ptr, sizeof(P));  // the same bytes, without breaking aliasing rules
  return x;
#endif
}

template <class P>
ADAMX_HD void store_pack(void* ptr, const P& x) {
#if defined(__CUDA_ARCH__)
  *static_cast<P*>(ptr) = x;
#else
  std::memcpy(ptr, &x, sizeof(P));
#endif
}

// Whether element `start` of `base` (of type T) starts a W-element vector in memory.
template <class T, int W>
ADAMX_HD bool aligned(const void* base, int64_t start) {
  return reinterpret_cast<uintptr_t>(static_cast<const T*>(base) + start) % (sizeof(T) * W) == 0;
}

ADAMX_HD double read_scalar(const void* ptr, Dtype dtype) {
  switch (dtype) {
    case Dtype::Float64: return *static_cast<const double*>(ptr);
    case Dtype::Float16: return static_cast<float>(*static_cast<const c10::Half*>(ptr));
    case Dtype::BFloat16: return static_cast<float>(*static_cast<const c10::BFloat16*>(ptr));
    case Dtype::Float32: break;
  }
  return *static_cast<const float*>(ptr);
}

// The step count of tensor `t`, after its increment.
ADAMX_HD double tensor_step(const LaunchTable& tab, int t) {
  switch (tab.step_source[t]) {
    case kStepFloat: return double(*static_cast<const float*>(tab.step[t].ptr));
    case kStepDouble: return *static_cast<const double*>(tab.step[t].ptr);
    default: return tab.step[t].value;
  }
}

// The step scalars of tensor `t`: host-computed, or computed here from a step count in
// memory (and the lr, possibly in device memory). Both compute in double, as the CPU
// kernel does, so they agree bitwise whenever pow() does.
template <class Var>
ADAMX_HD StepScalars<double> tensor_scalars(const LaunchTable& tab, int t) {
  StepScalars<double> s;
  if (tab.step_source[t] == kHostScalars) {
    s = tab.sets[tab.scalar_set[t]];
  } else {
    const double lr = tab.lr_ptr ? read_scalar(tab.lr_ptr, tab.lr_dtype) : tab.hyper.lr;
    s = step_scalars(tensor_step(tab, t), lr, tab.hyper, Var::on());
  }
  if (Var::unscale_grad && tab.grad_scale.ptr)
    s.grad_scale = read_scalar(tab.grad_scale.ptr, tab.grad_scale.dtype);
  return s;
}

// Whether block `block` takes the vector path: every pointer it touches, at its chunk's
// start, is aligned to a W-element vector of its type (which also makes the start a whole
// vector).
template <class Var, class P, class S>
ADAMX_HD bool block_is_vectorized(const LaunchTable& tab, int block) {
  constexpr int W = kVecElems<P, S>;
  const int64_t start = int64_t(tab.block_chunk[block]) * tab.chunk_size;
  const TensorPointers& x = tab.tensors[tab.block_tensor[block]];
  bool ok = aligned<P, W>(x.param, start) && aligned<P, W>(x.grad, start) &&
            aligned<S, W>(x.exp_avg, start) && aligned<S, W>(x.exp_avg_sq, start);
  if (Var::amsgrad) ok = ok && aligned<S, W>(x.max_exp_avg_sq, start);
  if (Var::master_weights) ok = ok && aligned<S, W>(x.master_param, start);
  return ok;
}

// One element (`index` in its tensor): widen to the math type, update, store the new
// param (rounded to nearest or stochastically; with a master copy, the master and its
// rounding), round the state back to its storage type.
template <class Var, class P, class S>
ADAMX_HD void update_one(P& p, P& g, S& m, S& v, S* vmax, S* master,
                         const StepScalars<ComputeType<P>>& s, uint64_t key, int64_t index) {
  using C = ComputeType<P>;
  C pc = Var::master_weights ? static_cast<C>(*master) : static_cast<C>(p);
  C gc = static_cast<C>(g), mc = static_cast<C>(m), vc = static_cast<C>(v);
  C xc = Var::amsgrad ? static_cast<C>(*vmax) : C(0);
  adam_update<Var>(pc, gc, mc, vc, xc, s);
  if constexpr (Var::stochastic_rounding) p = round_bf16_stochastic(pc, rounding_bits(key, index));
  else p = static_cast<P>(pc);
  if (Var::master_weights) *master = static_cast<S>(pc);
  if (Var::unscale_grad) g = static_cast<P>(gc);
  m = static_cast<S>(mc);
  v = static_cast<S>(vc);
  if (Var::amsgrad) *vmax = static_cast<S>(xc);
}

// The kernel body: what thread `thread` of block `block` (of `block_dim` threads) does.
template <class Var, class P, class S>
ADAMX_HD void adam_block_body(int block, int thread, int block_dim, const LaunchTable& tab) {
  using C = ComputeType<P>;
  constexpr int W = kVecElems<P, S>;
  // GradScaler found an inf or NaN: the step writes nothing (read once per thread, at entry).
  if (tab.found_inf.ptr && read_scalar(tab.found_inf.ptr, tab.found_inf.dtype) != 0) return;
  const int t = tab.block_tensor[block];
  const int64_t start = int64_t(tab.block_chunk[block]) * tab.chunk_size;
  const TensorPointers& tensor = tab.tensors[t];
  const int64_t rest = tensor.numel - start;
  const int64_t len = rest < tab.chunk_size ? rest : tab.chunk_size;
  // Round the scalars to the math type first, as torch (and the CPU kernel) do.
  const StepScalars<C> s = tensor_scalars<Var>(tab, t).template as<C>();
  const uint64_t key = Var::stochastic_rounding
                           ? rounding_key(tab.hyper.seed, tab.tensor_index[t], tensor_step(tab, t))
                           : 0;

  P* p = static_cast<P*>(tensor.param) + start;
  P* g = static_cast<P*>(tensor.grad) + start;
  S* m = static_cast<S*>(tensor.exp_avg) + start;
  S* v = static_cast<S*>(tensor.exp_avg_sq) + start;
  S* x = Var::amsgrad ? static_cast<S*>(tensor.max_exp_avg_sq) + start : nullptr;
  S* w = Var::master_weights ? static_cast<S*>(tensor.master_param) + start : nullptr;

  int64_t scalar_from = 0;  // elements before this went through the vector path
  if (block_is_vectorized<Var, P, S>(tab, block)) {
    using PP = Pack<P, W>;
    using SP = Pack<S, W>;
    const int64_t vectors = len / W;
    for (int64_t j = thread; j < vectors; j += block_dim) {
      const int64_t i = j * W;
      PP pp = load_pack<PP>(p + i), gp = load_pack<PP>(g + i);
      SP mp = load_pack<SP>(m + i), vp = load_pack<SP>(v + i), xp{}, wp{};
      if (Var::amsgrad) xp = load_pack<SP>(x + i);
      if (Var::master_weights) wp = load_pack<SP>(w + i);
      ADAMX_UNROLL
      for (int k = 0; k < W; ++k)
        update_one<Var, P, S>(pp.v[k], gp.v[k], mp.v[k], vp.v[k], &xp.v[k], &wp.v[k], s, key,
                              start + i + k);
      store_pack(p + i, pp);
      if (Var::master_weights) store_pack(w + i, wp);
      if (Var::unscale_grad) store_pack(g + i, gp);
      store_pack(m + i, mp);
      store_pack(v + i, vp);
      if (Var::amsgrad) store_pack(x + i, xp);
    }
    scalar_from = vectors * W;
  }
  for (int64_t i = scalar_from + thread; i < len; i += block_dim)
    update_one<Var, P, S>(p[i], g[i], m[i], v[i], x ? x + i : nullptr, w ? w + i : nullptr, s,
                          key, start + i);
}

}  // namespace adamx::cuda
