// CUDA side of the core: device queries used by tests and the dispatcher.
// Every kernel in csrc/cuda takes the caller's cudaStream_t (torch's current
// stream, passed from Python as an integer).
#include <cuda_runtime.h>

#include "common.h"

namespace fastassoc {

void register_cuda(py::module_& m) {
  register_cuda_memory(m);
  register_cuda_cluster(m);
  m.def(
      "cuda_device_count",
      []() {
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess) return 0;
        return count;
      },
      "Number of CUDA devices the compiled core can see (0 without a driver).");
}

}  // namespace fastassoc
