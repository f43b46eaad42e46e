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

#include "../../math/codes8.h"
#include "../../math/random.h"
#include "../../math/update.h"

#if defined(__CUDACC__)
#define ADAMX_UNROLL _Pragma("unroll")
#else
#define ADAMX_UNROLL _Pragma("GCC unroll 16")
#endif

namespace adamx::cuda {

// Capacity of one launch table. sizeof(LaunchTable) stays below the 4 KiB kernel
// parameter limit (static_assert below).
constexpr int kMaxTensors = 27;  // (30 no longer fit beside the element offsets)
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

union StepRef {
  const void* ptr;  // kStepFloat / kStepDouble: the step count (already incremented)
  double value;     // kHostScalars / kStepValue: the step count
};

struct LaunchTable {
  // Per tensor (index < num_tensors).
  TensorPointers tensors[kMaxTensors];
  StepRef step[kMaxTensors];
  int64_t element_offset[kMaxTensors];  // its random streams (RoundingKeys: AdamArgs'
  uint32_t param_id[kMaxTensors];       // element_offsets and param_ids)
  // Per launch.
  StepScalars<double> sets[kMaxScalarSets];  // host-computed scalars (kHostScalars)
  Hyper hyper;                               // for scalars computed in the kernel
  Switches switches;                         // the same
  ScalarOperand lr;                          // the lr (a value, or device memory)
  ScalarOperand grad_scale;                  // the divisor of the grads (unscale_grad)
  ScalarOperand found_inf;                   // non-zero: every block returns at entry
  int64_t chunk_size;
  int32_t num_tensors;
  int32_t num_blocks;
  // Per block (index < num_blocks): which tensor, which chunk of it.
  int32_t block_chunk[kMaxBlocks];
  uint8_t block_tensor[kMaxBlocks];
  // Per tensor, small.
  uint8_t step_source[kMaxTensors];
  uint8_t scalar_set[kMaxTensors];
};

static_assert(sizeof(LaunchTable) <= 4000, "the launch table must fit in 4 KiB of kernel parameters");
static_assert(kMaxTensors <= 256 && kMaxScalarSets <= 256, "uint8_t indices");
static_assert(std::is_trivially_copyable_v<LaunchTable>, "passed by value to a kernel");

// Elements per vector step: 16 bytes of the widest of the param, moment and master types.
template <class Var, class P, class S>
constexpr int kVecElems = [] {
  size_t widest = sizeof(P) > sizeof(MomentStorage<S>) ? sizeof(P) : sizeof(MomentStorage<S>);
  if (Var::master_weights && widest < sizeof(float)) widest = sizeof(float);
  return int(kVectorBytes / widest);
}();

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
    s = step_scalars(tensor_step(tab, t), value_of(tab.lr), tab.hyper, tab.switches);
  }
  if (Var::unscale_grad && tab.grad_scale.memory) s.grad_scale = value_of(tab.grad_scale);
  return s;
}

// The preamble of every block: its chunk of its tensor, elements [start, start + len).
// False when the step writes nothing (GradScaler found an inf or NaN: found_inf, read once
// per thread, at entry).
struct Chunk {
  int t;  // the tensor's slot in the table
  const TensorPointers* tensor;
  int64_t start, len;
};
ADAMX_HD int64_t chunk_start(const LaunchTable& tab, int block) {
  return int64_t(tab.block_chunk[block]) * tab.chunk_size;
}
ADAMX_HD bool chunk_of(const LaunchTable& tab, int block, Chunk& c) {
  if (tab.found_inf.memory && value_of(tab.found_inf) != 0) return false;
  c.t = tab.block_tensor[block];
  c.tensor = &tab.tensors[c.t];
  c.start = chunk_start(tab, block);
  const int64_t rest = c.tensor->numel - c.start;
  c.len = rest < tab.chunk_size ? rest : tab.chunk_size;
  return true;
}

// Whether block `block` takes the vector path: every pointer it touches, at its chunk's
// start, is aligned to a W-element vector of its type (which also makes the start a whole
// vector).
template <class Var, class P, class S>
ADAMX_HD bool block_is_vectorized(const LaunchTable& tab, int block) {
  if constexpr (std::is_same_v<S, Codes8>) {
    return false;  // blocks of codes have their own body (code_lane_update)
  } else {
  using M = MomentStorage<S>;
  constexpr int W = kVecElems<Var, P, S>;
  const int64_t start = chunk_start(tab, block);
  const TensorPointers& tensor = tab.tensors[tab.block_tensor[block]];
  bool ok = aligned<P, W>(tensor.param, start) && aligned<P, W>(tensor.grad, start) &&
            aligned<M, W>(tensor.exp_avg, start) && aligned<M, W>(tensor.exp_avg_sq, start);
  if (Var::amsgrad) ok = ok && aligned<M, W>(tensor.max_exp_avg_sq, start);
  if (Var::master_weights) ok = ok && aligned<float, W>(tensor.master_param, start);
  return ok;
  }
}

// The new param of one element (`index` in its tensor), stored: rounded to nearest or
// stochastically (element keys.offset + index of the param's stream); with a master copy,
// the master and its rounding.
template <class Var, class P, class C>
ADAMX_HD void store_param(P& p, float* master, C pc, const RoundingKeys& keys, int64_t index) {
  if constexpr (Var::stochastic_rounding)
    p = round_bf16_stochastic(pc, rounding_bits(keys.param, keys.offset + index));
  else p = static_cast<P>(pc);
  if (Var::master_weights) *master = static_cast<float>(pc);
}

// One element (`index` in its tensor): widen to the math type (with a master copy, the copy
// unless the param was written since: master_to_update), update, store the new param,
// round the moments back to their storage (stochastically for bfloat16 moments).
template <class Var, class P, class S, class M = MomentStorage<S>>
ADAMX_HD void update_one(P& p, P& g, M& m, M& v, M* vmax, float* master,
                         const StepScalars<ComputeType<P>>& s, const RoundingKeys& keys,
                         int64_t index) {
  using C = ComputeType<P>;
  C pc;
  if constexpr (Var::master_weights) pc = master_to_update(*master, p);
  else pc = static_cast<C>(p);
  C gc = static_cast<C>(g), mc = static_cast<C>(m), vc = static_cast<C>(v);
  C xc = Var::amsgrad ? static_cast<C>(*vmax) : C(0);
  adam_update<Var>(pc, gc, mc, vc, xc, s);
  store_param<Var>(p, master, pc, keys, index);
  if (Var::unscale_grad && s.store_grad) g = static_cast<P>(gc);
  if constexpr (kCompact<S>) {
    const uint32_t r = moment_bits(keys.moments, keys.offset + index);
    m = round_bf16_stochastic(mc, moment_random(r, 0));
    v = round_bf16_stochastic(vc, moment_random(r, 1));
  } else {
    m = static_cast<M>(mc);
    v = static_cast<M>(vc);
    if (Var::amsgrad) *vmax = static_cast<M>(xc);
  }
}

// The random streams of tensor `t` in this step (zero when nothing is rounded at random).
template <class Var, class S>
ADAMX_HD RoundingKeys tensor_keys(const LaunchTable& tab, int t) {
  if (!Var::stochastic_rounding && !kCompact<S>) return RoundingKeys();
  return RoundingKeys(rounding_key(tab.hyper.seed, tab.param_id[t], tensor_step(tab, t)),
                      tab.element_offset[t]);
}

// The kernel body: what thread `thread` of block `block` (of `block_dim` threads) does.
template <class Var, class P, class S>
ADAMX_HD void adam_block_body(int block, int thread, int block_dim, const LaunchTable& tab) {
  using C = ComputeType<P>;
  using M = MomentStorage<S>;
  constexpr int W = kVecElems<Var, P, S>;
  Chunk chunk;
  if (!chunk_of(tab, block, chunk)) return;
  const int t = chunk.t;
  const TensorPointers& tensor = *chunk.tensor;
  const int64_t start = chunk.start, len = chunk.len;
  // Round the scalars to the math type first, as torch (and the CPU kernel) do.
  const StepScalars<C> s = tensor_scalars<Var>(tab, t).template as<C>();
  const RoundingKeys keys = tensor_keys<Var, S>(tab, t);

  P* p = static_cast<P*>(tensor.param) + start;
  P* g = static_cast<P*>(tensor.grad) + start;
  M* m = static_cast<M*>(tensor.exp_avg) + start;
  M* v = static_cast<M*>(tensor.exp_avg_sq) + start;
  M* x = Var::amsgrad ? static_cast<M*>(tensor.max_exp_avg_sq) + start : nullptr;
  float* w = Var::master_weights ? static_cast<float*>(tensor.master_param) + start : nullptr;

  int64_t scalar_from = 0;  // elements before this went through the vector path
  if (block_is_vectorized<Var, P, S>(tab, block)) {
    using PP = Pack<P, W>;
    using SP = Pack<M, W>;
    using FP = Pack<float, W>;
    const int64_t vectors = len / W;
    for (int64_t j = thread; j < vectors; j += block_dim) {
      const int64_t i = j * W;
      PP pp = load_pack<PP>(p + i), gp = load_pack<PP>(g + i);
      SP mp = load_pack<SP>(m + i), vp = load_pack<SP>(v + i), xp{};
      FP wp{};
      if (Var::amsgrad) xp = load_pack<SP>(x + i);
      if (Var::master_weights) wp = load_pack<FP>(w + i);
      ADAMX_UNROLL
      for (int k = 0; k < W; ++k)
        update_one<Var, P, S>(pp.v[k], gp.v[k], mp.v[k], vp.v[k], &xp.v[k], &wp.v[k], s, keys,
                              start + i + k);
      store_pack(p + i, pp);
      if (Var::master_weights) store_pack(w + i, wp);
      if (Var::unscale_grad && s.store_grad) store_pack(g + i, gp);
      store_pack(m + i, mp);
      store_pack(v + i, vp);
      if (Var::amsgrad) store_pack(x + i, xp);
    }
    scalar_from = vectors * W;
  }
  for (int64_t i = scalar_from + thread; i < len; i += block_dim)
    update_one<Var, P, S>(p[i], g[i], m[i], v[i], x ? x + i : nullptr, w ? w + i : nullptr, s,
                          keys, start + i);
}

// Blocks of 8-bit codes (Codes8; see math/codes8.h). A block's new scales
// need the largest magnitude of its new moments, so a warp (kWarpSize lanes) updates one
// block of codes at a time: lane `lane` updates its kLaneElems consecutive elements, keeping
// their new moments in registers (`CodeLane`, code_lane_update), then the warp takes the
// largest magnitude over its lanes (the one collective: shuffles in kernel.cu, a loop over
// the lanes in the emulation), then each lane encodes and stores its codes
// (code_lane_store). Each CUDA block owns one chunk of a tensor, as above; the chunk size
// of these launches is a multiple of kCodeBlock, and the block's warps take the chunk's
// blocks of codes in turn.
constexpr int kWarpSize = 32;
constexpr int kLaneElems = int(kCodeBlock) / kWarpSize;
static_assert(kLaneElems * kWarpSize == kCodeBlock, "a warp covers a block of codes");

struct CodeLane {
  float m[kLaneElems], v[kLaneElems];
  float m_max, v_max;  // largest magnitudes of the lane's new moments
};

// What every lane of a CUDA block needs: its tensor, its step scalars and random streams,
// the blocks of codes in its chunk.
template <class P>
struct CodeChunk {
  const TensorPointers* tensor;
  StepScalars<ComputeType<P>> s;
  RoundingKeys keys;
  int64_t first, count;  // blocks of codes [first, first + count) of the tensor
  bool skip;             // found_inf: the step writes nothing
};

template <class Var, class P>
ADAMX_HD CodeChunk<P> code_chunk(const LaunchTable& tab, int block) {
  CodeChunk<P> c{};
  Chunk chunk;
  c.skip = !chunk_of(tab, block, chunk);
  if (c.skip) return c;
  c.tensor = chunk.tensor;
  c.first = chunk.start / kCodeBlock;
  c.count = (chunk.len + kCodeBlock - 1) / kCodeBlock;
  c.s = tensor_scalars<Var>(tab, chunk.t).template as<ComputeType<P>>();
  c.keys = tensor_keys<Var, Codes8>(tab, chunk.t);
  return c;
}

// Where lane `lane`'s elements of block of codes `q` start, and how many of them the
// tensor has (kLaneElems, fewer at its end, or none).
ADAMX_HD int64_t lane_start(int64_t q, int lane) {
  return q * kCodeBlock + int64_t(lane) * kLaneElems;
}
ADAMX_HD int lane_elems(const TensorPointers& tensor, int64_t e0) {
  const int64_t left = tensor.numel - e0;
  return left <= 0 ? 0 : left < kLaneElems ? int(left) : kLaneElems;
}

// Lane `lane`'s part of block of codes `q`: decode, update, store the param (and master
// copy, unscaled grad), keep the new moments in `r`.
template <class Var, class P>
ADAMX_HD void code_lane_update(const CodeChunk<P>& c, int64_t q, int lane, CodeLane& r) {
  using C = ComputeType<P>;
  const TensorPointers& tensor = *c.tensor;
  const int64_t e0 = lane_start(q, lane);
  const int n = lane_elems(tensor, e0);
  const float m_scale = tensor.code_scales[q];
  const float v_scale = tensor.code_scales[code_blocks(tensor.numel) + q];
  P* p = static_cast<P*>(tensor.param) + e0;
  P* g = static_cast<P*>(tensor.grad) + e0;
  const uint8_t* m_codes = static_cast<const uint8_t*>(tensor.exp_avg) + e0;
  const uint8_t* v_codes = static_cast<const uint8_t*>(tensor.exp_avg_sq) + e0;
  float* w = Var::master_weights ? static_cast<float*>(tensor.master_param) + e0 : nullptr;
  r.m_max = r.v_max = 0.0f;
  // Whole lanes load and store vectors where the pointers allow, else element by element.
  using PP = Pack<P, kLaneElems>;
  using CP = Pack<uint8_t, kLaneElems>;
  using FP = Pack<float, kLaneElems>;
  const bool vec = n == kLaneElems && aligned<P, kLaneElems>(p, 0) &&
                   aligned<P, kLaneElems>(g, 0) && aligned<uint8_t, kLaneElems>(m_codes, 0) &&
                   aligned<uint8_t, kLaneElems>(v_codes, 0) &&
                   (!Var::master_weights || aligned<float, 4>(w, 0));
  PP pp{}, gp{};
  CP mp{}, vp{};
  FP wp{};
  if (vec) {
    pp = load_pack<PP>(p);
    gp = load_pack<PP>(g);
    mp = load_pack<CP>(m_codes);
    vp = load_pack<CP>(v_codes);
    if (Var::master_weights) {
      for (int h = 0; h < kLaneElems; h += 4) {
        const auto part = load_pack<Pack<float, 4>>(w + h);
        for (int k = 0; k < 4; ++k) wp.v[h + k] = part.v[k];
      }
    }
  } else {
    for (int k = 0; k < n; ++k) {
      pp.v[k] = p[k];
      gp.v[k] = g[k];
      mp.v[k] = m_codes[k];
      vp.v[k] = v_codes[k];
      if (Var::master_weights) wp.v[k] = w[k];
    }
  }
  ADAMX_UNROLL
  for (int k = 0; k < kLaneElems; ++k) {
    r.m[k] = r.v[k] = 0.0f;
    if (k >= n) continue;
    C pc;
    if constexpr (Var::master_weights) pc = master_to_update(wp.v[k], pp.v[k]);
    else pc = static_cast<C>(pp.v[k]);
    C gc = static_cast<C>(gp.v[k]);
    C m = decode_code<true>(mp.v[k], m_scale), v = decode_code<false>(vp.v[k], v_scale), unused = 0;
    adam_update<Var>(pc, gc, m, v, unused, c.s);
    store_param<Var>(pp.v[k], &wp.v[k], pc, c.keys, e0 + k);
    if (Var::unscale_grad) gp.v[k] = static_cast<P>(gc);  // stored below unless kept
    r.m[k] = m;
    r.v[k] = v;
    r.m_max = absmax_of(r.m_max, m);
    r.v_max = absmax_of(r.v_max, v);
  }
  if (vec) {
    store_pack(p, pp);
    if (Var::unscale_grad && c.s.store_grad) store_pack(g, gp);
    if (Var::master_weights) {
      for (int h = 0; h < kLaneElems; h += 4) {
        Pack<float, 4> part;
        for (int k = 0; k < 4; ++k) part.v[k] = wp.v[h + k];
        store_pack(w + h, part);
      }
    }
  } else {
    for (int k = 0; k < n; ++k) {
      p[k] = pp.v[k];
      if (Var::unscale_grad && c.s.store_grad) g[k] = gp.v[k];
      if (Var::master_weights) w[k] = wp.v[k];
    }
  }
}

// Lane `lane`'s codes of block `q`, from the new moments in `r` and the warp's largest
// magnitudes; lane 0 stores the block's scales.
template <class P>
ADAMX_HD void code_lane_store(const CodeChunk<P>& c, int64_t q, int lane, const CodeLane& r,
                              float m_max, float v_max) {
  const TensorPointers& tensor = *c.tensor;
  const int64_t e0 = lane_start(q, lane);
  const int n = lane_elems(tensor, e0);
  const CodeScale m_scale = code_scale(m_max), v_scale = code_scale(v_max);
  uint8_t* m_codes = static_cast<uint8_t*>(tensor.exp_avg) + e0;
  uint8_t* v_codes = static_cast<uint8_t*>(tensor.exp_avg_sq) + e0;
  Pack<uint8_t, kLaneElems> mp{}, vp{};
  ADAMX_UNROLL
  for (int k = 0; k < kLaneElems; ++k) {
    const uint32_t bits = moment_bits(c.keys.moments, c.keys.offset + e0 + k);
    mp.v[k] = encode_code<true>(r.m[k], m_scale.inv, moment_random(bits, 0));
    vp.v[k] = encode_code<false>(r.v[k], v_scale.inv, moment_random(bits, 1));
  }
  if (n == kLaneElems && aligned<uint8_t, kLaneElems>(m_codes, 0) &&
      aligned<uint8_t, kLaneElems>(v_codes, 0)) {
    store_pack(m_codes, mp);
    store_pack(v_codes, vp);
  } else {
    for (int k = 0; k < n; ++k) {
      m_codes[k] = mp.v[k];
      v_codes[k] = vp.v[k];
    }
  }
  if (lane == 0) {
    tensor.code_scales[q] = m_scale.scale;
    tensor.code_scales[code_blocks(tensor.numel) + q] = v_scale.scale;
  }
}

}  // namespace adamx::cuda
