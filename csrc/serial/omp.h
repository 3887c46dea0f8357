// Stand-in for <omp.h> in builds without OpenMP (CMakeLists.txt puts this folder first on
// the include path only when FASTASSOC_OPENMP is off or the compiler has no OpenMP, e.g.
// Apple clang without libomp). The kernels include <omp.h> unconditionally; without
// -fopenmp their `#pragma omp` lines are ignored and every region runs on the calling
// thread, so these answer as an OpenMP runtime would inside a team of one.
#pragma once

#ifdef _OPENMP
#error "csrc/serial/omp.h is the serial stand-in; an OpenMP build must use the compiler's <omp.h>"
#endif

inline int omp_get_thread_num() { return 0; }
inline int omp_get_num_threads() { return 1; }
inline int omp_get_max_threads() { return 1; }
inline int omp_get_num_procs() { return 1; }
inline int omp_in_parallel() { return 0; }
inline void omp_set_num_threads(int) {}
