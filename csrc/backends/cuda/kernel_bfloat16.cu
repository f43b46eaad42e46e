// The CUDA kernels of bfloat16 params (see kernel_body.cuh).
#include "kernel_body.cuh"

namespace adamx::cuda {
template void launch_tables_of<c10::BFloat16>(StateKind, const Switches&, const LaunchTable*, size_t,
                                    cudaStream_t);
}  // namespace adamx::cuda
