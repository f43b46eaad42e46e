// What every __host__ __device__ header of adamx shares: ADAMX_HD (a function the CPU
// kernel, the CUDA body and its CPU emulation all call) and float32 bit casts.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ADAMX_HD __host__ __device__ __forceinline__
#else
#define ADAMX_HD inline
#endif

namespace adamx {

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

}  // namespace adamx
