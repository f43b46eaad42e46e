// The CUDA kernels' launcher: picks the translation unit of the params' dtype
// (kernel_<dtype>.cu, each instantiating kernel_body.cuh's launch_tables_of<P>).
#include "kernel.h"

namespace adamx::cuda {

template <class P>
void launch_tables_of(StateKind kind, const Switches& switches, const LaunchTable* tables,
                      size_t n, cudaStream_t stream);

void launch_adam_tables(Dtype dtype, StateKind kind, const Switches& switches,
                        const LaunchTable* tables, size_t n, cudaStream_t stream) {
  dispatch_dtype(dtype, [&]<class P>() {
    launch_tables_of<P>(kind, switches, tables, n, stream);
  });
}

}  // namespace adamx::cuda
