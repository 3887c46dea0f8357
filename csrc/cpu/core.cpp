// Build facts the Python dispatcher needs: is CUDA compiled in, how many
// OpenMP threads the kernels use.
#include <omp.h>

#include "common.h"

namespace fastassoc {

void register_core(py::module_& m) {
  m.def(
      "has_cuda",
      []() {
#ifdef FASTASSOC_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA kernels in csrc/cuda were compiled into this module.");
  m.def("has_openmp", []() { return true; }, "True: the CPU kernels use OpenMP.");
  m.def("get_num_threads", []() { return omp_get_max_threads(); },
        "Number of OpenMP threads the CPU kernels use.");
  m.def("set_num_threads", [](int n) {
        require(n >= 1, "num_threads must be >= 1, got " + std::to_string(n));
        omp_set_num_threads(n);
      }, py::arg("num_threads"), "Set the number of OpenMP threads the CPU kernels use.");
}

}  // namespace fastassoc
