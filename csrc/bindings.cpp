// The one extension module, fastassoc._C. Each op family registers its own
// functions (m.def + docstring) from its source file; this file only wires them.
#include "common.h"

namespace fastassoc {
void register_cpu_rerank(py::module_& m);  // csrc/cpu/rerank.cpp
}  // namespace fastassoc

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastassoc compiled core: C++/OpenMP CPU kernels and, when built with nvcc, CUDA kernels";
  fastassoc::register_core(m);
  fastassoc::register_cpu_knn(m);
  fastassoc::register_cpu_graph(m);
  fastassoc::register_cpu_loss(m);
  fastassoc::register_cpu_cluster(m);
  fastassoc::register_cpu_memory(m);
  fastassoc::register_cpu_evaluation(m);
  fastassoc::register_cpu_screen(m);
  fastassoc::register_cpu_rerank(m);
#ifdef FASTASSOC_WITH_CUDA
  fastassoc::register_cuda(m);
#endif
}
