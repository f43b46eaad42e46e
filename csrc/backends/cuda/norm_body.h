// The multi-tensor CUDA norm (adamx::norm_accumulate): its launch table and kernel bodies.
//
// Plain __host__ __device__ C++, like block_body.h: the __global__ wrappers (norm_kernel.cu)
// forward their block and thread indices to these functions, and the CPU emulation
// (norm_emulate.cpp) calls the same functions for every block and thread.
//
// Two kernels. The first gives each block one chunk (chunk_size elements) of one tensor:
// each thread accumulates its elements (csrc/math/norm.h: in double), the block joins its
// threads' accumulators in a fixed tree (stride block_dim/2, then half that, ... 1), and
// thread 0 writes the block's accumulator to `partials`, at the chunk's index among all
// chunks of the call. The second, one block, joins those in the same way. No atomics and
// no dependence on the GPU: the same inputs give the same bits on any GPU, and in the
// emulation. Nothing is read back on the host (a CUDA graph can capture the launches).
#pragma once

#include <cstdint>

#include "../../math/norm.h"
#include "block_body.h"

namespace adamx::cuda {

constexpr int kNormMaxTensors = 64;
constexpr int64_t kNormChunkSize = 65536;  // elements per block
constexpr int kNormBlockDim = 512;         // threads per block: a power of two

struct NormTable {
  // Per tensor (index < num_tensors): tensor t's chunks are blocks
  // [first_block[t], first_block[t + 1]) of this launch.
  const void* data[kNormMaxTensors];
  int64_t numel[kNormMaxTensors];
  int64_t first_block[kNormMaxTensors + 1];
  double* partials;       // block b writes partials[first_partial + b]
  int64_t first_partial;
  int64_t chunk_size;
  double p;
  int32_t num_tensors;
  NormOrder order;
  Dtype dtype[kNormMaxTensors];
};

static_assert(sizeof(NormTable) <= 4000, "the norm table must fit in 4 KiB of kernel parameters");
static_assert(std::is_trivially_copyable_v<NormTable>, "passed by value to a kernel");

ADAMX_HD int64_t norm_num_blocks(const NormTable& tab) { return tab.first_block[tab.num_tensors]; }

template <class T>
ADAMX_HD double widen(T x) {
  if constexpr (std::is_same_v<T, double>) return x;
  else return double(float(x));  // exact for float16 and bfloat16 too
}

// Thread `thread`'s accumulator over its elements of [start, start + len) of x: 16-byte
// vectors (W elements) at start + (thread + k * block_dim) * W when the chunk starts on a
// vector, then the elements after the last whole vector (all of them, otherwise) at
// thread + k * block_dim.
template <NormOrder O, class T>
ADAMX_HD double norm_thread_elems(const T* x, int64_t start, int64_t len, double p, int thread,
                                  int block_dim) {
  constexpr int W = kVectorBytes / int(sizeof(T));
  double acc = 0.0;
  int64_t done = 0;
  if (aligned<T, W>(x, start)) {
    const int64_t vecs = len / W;
    for (int64_t k = thread; k < vecs; k += block_dim) {
      const auto pack = load_pack<Pack<T, W>>(x + start + k * W);
      ADAMX_UNROLL
      for (int j = 0; j < W; ++j) acc = norm_add(O, p, acc, widen(pack.v[j]));
    }
    done = vecs * W;
  }
  for (int64_t i = done + thread; i < len; i += block_dim) acc = norm_add(O, p, acc, widen(x[start + i]));
  return acc;
}

template <NormOrder O>
ADAMX_HD double norm_thread_of_order(const NormTable& tab, int t, int64_t start, int64_t len,
                                     int thread, int block_dim) {
  const void* x = tab.data[t];
  switch (tab.dtype[t]) {
    case Dtype::Float64:
      return norm_thread_elems<O>(static_cast<const double*>(x), start, len, tab.p, thread, block_dim);
    case Dtype::Float16:
      return norm_thread_elems<O>(static_cast<const c10::Half*>(x), start, len, tab.p, thread, block_dim);
    case Dtype::BFloat16:
      return norm_thread_elems<O>(static_cast<const c10::BFloat16*>(x), start, len, tab.p, thread, block_dim);
    case Dtype::Float32: break;
  }
  return norm_thread_elems<O>(static_cast<const float*>(x), start, len, tab.p, thread, block_dim);
}

// Thread `thread`'s accumulator in block `block` of a launch of `tab` (the first kernel).
ADAMX_HD double norm_thread_partial(const NormTable& tab, int64_t block, int thread, int block_dim) {
  int t = 0;  // the block's tensor: the last whose first block is at most `block`
  int hi = tab.num_tensors;
  while (hi - t > 1) {
    const int mid = (t + hi) / 2;
    if (tab.first_block[mid] <= block) t = mid;
    else hi = mid;
  }
  const int64_t start = (block - tab.first_block[t]) * tab.chunk_size;
  const int64_t rest = tab.numel[t] - start;
  const int64_t len = rest < tab.chunk_size ? rest : tab.chunk_size;
  switch (tab.order) {
    case NormOrder::One: return norm_thread_of_order<NormOrder::One>(tab, t, start, len, thread, block_dim);
    case NormOrder::Two: return norm_thread_of_order<NormOrder::Two>(tab, t, start, len, thread, block_dim);
    case NormOrder::Inf: return norm_thread_of_order<NormOrder::Inf>(tab, t, start, len, thread, block_dim);
    case NormOrder::P: break;
  }
  return norm_thread_of_order<NormOrder::P>(tab, t, start, len, thread, block_dim);
}

// Thread `thread`'s accumulator of the second kernel: partials thread, thread + block_dim, ...
ADAMX_HD double norm_final_thread(const double* partials, int64_t count, NormOrder order,
                                  int thread, int block_dim) {
  double acc = 0.0;
  for (int64_t i = thread; i < count; i += block_dim) acc = norm_join(order, acc, partials[i]);
  return acc;
}

// One level of a block's tree: threads below `stride` join in the value `stride` above.
ADAMX_HD void norm_tree_step(double* shared, NormOrder order, int thread, int stride) {
  if (thread < stride) shared[thread] = norm_join(order, shared[thread], shared[thread + stride]);
}

}  // namespace adamx::cuda
