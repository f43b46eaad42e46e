// The CUDA kernels of double params (see kernel_body.cuh).
#include "kernel_body.cuh"

namespace adamx::cuda {
template void launch_tables_of<double>(StateKind, const Switches&, const LaunchTable*, size_t,
                                    cudaStream_t);
}  // namespace adamx::cuda
