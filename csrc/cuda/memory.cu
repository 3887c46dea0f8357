// CUDA memory EMA: the `cuda` backend of ema_update_ (launcher:
// fastassoc/kernels/cuda/memory.py). Must equal
// fastassoc.kernels.reference.memory.ema_update_reference within float32 rounding.
//
// Algorithm. The launcher stably sorts `index` on the device (torch.sort(stable=True))
// and passes the permutation `order` and the sorted values `sorted_index`. One warp
// per sorted position; a warp whose position is not the first of its run of equal
// rows exits at once, so exactly one warp owns each distinct row: no races, no
// atomics, and each row's values are visited in `index` order (deterministic, equal
// to the reference's summation order). The owning warp keeps the row in float32
// (float64 for float64 banks) while it
//   * sum / mean: adds the values (L2-normalised first when `normalize`), divides by
//     the run length for mean, then row <- m * row + (1 - m) * total;
//   * sequential: row <- m * row + (1 - m) * value per value, normalising after each;
// then normalises (sum / mean with `normalize`) and stores the row once, rounded to
// the bank dtype (round to nearest even, as torch).
// Normalisation is x / max(|x|, 1e-12) (torch.nn.functional.normalize); norms are
// warp-shuffle reductions.
//
// Limits. Lane l holds elements l, l + 32, ... of the row in registers when
// D <= 2048 (VPT = values per lane, a template parameter); wider rows live in a
// caller-provided global scratch [B, 2 * ceil(D / 32) * 32] (same arithmetic,
// lane-private, so still race-free). The kernel runs on the caller's stream (torch's current stream).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.h"

namespace fastassoc {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kMaxRegisterValuesPerLane = 64;  // D <= 2048 stays in registers

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ double from_acc_double(double x) { return x; }

template <typename T, typename Acc>
__device__ __forceinline__ T store_value(Acc x) {
  if constexpr (sizeof(Acc) == 8) {
    return from_acc_double(x);
  } else {
    return from_acc<T>(x);
  }
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename Acc>
__device__ __forceinline__ Acc norm_denominator(Acc squared_norm) {
  const Acc norm = sqrt(squared_norm);
  return norm > Acc(1e-12) ? norm : Acc(1e-12);
}

// VPT > 0: the row lives in registers, VPT values per lane; VPT == 0: in scratch.
template <typename T, typename Acc, int VPT>
__global__ void ema_update_warp_kernel(T* __restrict__ bank, const T* __restrict__ values,
                                       const int64_t* __restrict__ order, const int64_t* __restrict__ sorted_index,
                                       int64_t count, int64_t dim, Acc keep, Acc mix, bool normalize, int reduce,
                                       Acc* __restrict__ scratch) {
  const int64_t position = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  // Warp-uniform exits keep every shuffle below full-warp.
  if (position >= count) return;
  const int64_t row = sorted_index[position];
  if (position > 0 && sorted_index[position - 1] == row) return;
  int64_t run_end = position + 1;
  while (run_end < count && sorted_index[run_end] == row) ++run_end;

  constexpr int kSlots = VPT > 0 ? VPT : 1;
  const int iterations = VPT > 0 ? VPT : static_cast<int>((dim + kWarp - 1) / kWarp);
  Acc state_registers[kSlots];
  Acc total_registers[kSlots];
  Acc* state_memory = nullptr;
  Acc* total_memory = nullptr;
  if constexpr (VPT == 0) {
    // Rows padded to whole warps: lanes past D keep (zero) slots of their own.
    const int64_t padded = static_cast<int64_t>(iterations) * kWarp;
    state_memory = scratch + position * 2 * padded + lane;
    total_memory = state_memory + padded;
  }
  auto state = [&](int i) -> Acc& {
    if constexpr (VPT > 0) return state_registers[i]; else return state_memory[kWarp * i];
  };
  auto total = [&](int i) -> Acc& {
    if constexpr (VPT > 0) return total_registers[i]; else return total_memory[kWarp * i];
  };

  T* bank_row = bank + row * dim;
#pragma unroll
  for (int i = 0; i < (VPT > 0 ? VPT : iterations); ++i) {
    const int64_t d = lane + static_cast<int64_t>(kWarp) * i;
    state(i) = d < dim ? to_acc(bank_row[d]) : Acc(0);
    total(i) = Acc(0);
  }

  for (int64_t k = position; k < run_end; ++k) {
    const T* value_row = values + order[k] * dim;
    Acc denominator = Acc(1);
    if (normalize) {
      Acc squared = Acc(0);
#pragma unroll
      for (int i = 0; i < (VPT > 0 ? VPT : iterations); ++i) {
        const int64_t d = lane + static_cast<int64_t>(kWarp) * i;
        const Acc v = d < dim ? to_acc(value_row[d]) : Acc(0);
        squared += v * v;
      }
      denominator = norm_denominator(warp_sum(squared));
    }
    if (reduce == 2) {
      Acc squared = Acc(0);
#pragma unroll
      for (int i = 0; i < (VPT > 0 ? VPT : iterations); ++i) {
        const int64_t d = lane + static_cast<int64_t>(kWarp) * i;
        const Acc v = d < dim ? to_acc(value_row[d]) / denominator : Acc(0);
        state(i) = keep * state(i) + mix * v;
        squared += state(i) * state(i);
      }
      if (normalize) {
        const Acc row_denominator = norm_denominator(warp_sum(squared));
#pragma unroll
        for (int i = 0; i < (VPT > 0 ? VPT : iterations); ++i) state(i) /= row_denominator;
      }
    } else {
#pragma unroll
      for (int i = 0; i < (VPT > 0 ? VPT : iterations); ++i) {
        const int64_t d = lane + static_cast<int64_t>(kWarp) * i;
        if (d < dim) total(i) += to_acc(value_row[d]) / denominator;
      }
    }
  }

  if (reduce != 2) {
    const Acc run_length = static_cast<Acc>(run_end - position);
    Acc squared = Acc(0);
#pragma unroll
    for (int i = 0; i < (VPT > 0 ? VPT : iterations); ++i) {
      const Acc reduced = reduce == 0 ? total(i) / run_length : total(i);
      state(i) = keep * state(i) + mix * reduced;
      squared += state(i) * state(i);
    }
    if (normalize) {
      const Acc row_denominator = norm_denominator(warp_sum(squared));
#pragma unroll
      for (int i = 0; i < (VPT > 0 ? VPT : iterations); ++i) state(i) /= row_denominator;
    }
  }

#pragma unroll
  for (int i = 0; i < (VPT > 0 ? VPT : iterations); ++i) {
    const int64_t d = lane + static_cast<int64_t>(kWarp) * i;
    if (d < dim) bank_row[d] = store_value<T, Acc>(state(i));
  }
}

template <typename T, typename Acc, int VPT>
void launch_ema(std::uintptr_t bank, std::uintptr_t values, std::uintptr_t order, std::uintptr_t sorted_index,
                int64_t count, int64_t dim, double momentum, bool normalize, int reduce, std::uintptr_t scratch,
                cudaStream_t stream) {
  const int64_t threads = count * kWarp;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  ema_update_warp_kernel<T, Acc, VPT><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      as_ptr<T>(bank), as_ptr<const T>(values), as_ptr<const int64_t>(order), as_ptr<const int64_t>(sorted_index),
      count, dim, static_cast<Acc>(momentum), static_cast<Acc>(1.0 - momentum), normalize, reduce,
      as_ptr<Acc>(scratch));
}

template <typename T, typename Acc>
void dispatch_values_per_lane(std::uintptr_t bank, std::uintptr_t values, std::uintptr_t order,
                              std::uintptr_t sorted_index, int64_t count, int64_t dim, double momentum,
                              bool normalize, int reduce, std::uintptr_t scratch, cudaStream_t stream) {
  const int64_t per_lane = (dim + kWarp - 1) / kWarp;
#define FASTASSOC_EMA_CASE(VPT)                                                                          \
  if (per_lane <= VPT) {                                                                                 \
    launch_ema<T, Acc, VPT>(bank, values, order, sorted_index, count, dim, momentum, normalize, reduce, \
                            scratch, stream);                                                          \
    return;                                                                                              \
  }
  FASTASSOC_EMA_CASE(1)
  FASTASSOC_EMA_CASE(2)
  FASTASSOC_EMA_CASE(4)
  FASTASSOC_EMA_CASE(8)
  FASTASSOC_EMA_CASE(16)
  FASTASSOC_EMA_CASE(32)
  FASTASSOC_EMA_CASE(kMaxRegisterValuesPerLane)
#undef FASTASSOC_EMA_CASE
  require(scratch != 0,
          "cuda_ema_update: D > 2048 needs a scratch buffer of B * 2 * ceil(D / 32) * 32 accumulator elements");
  launch_ema<T, Acc, 0>(bank, values, order, sorted_index, count, dim, momentum, normalize, reduce, scratch, stream);
}

int reduce_code(const std::string& reduce) {
  if (reduce == "mean") return 0;
  if (reduce == "sum") return 1;
  if (reduce == "sequential") return 2;
  throw std::invalid_argument("reduce must be 'mean', 'sum' or 'sequential', got '" + reduce + "'");
}

void cuda_ema_update(std::uintptr_t bank, std::uintptr_t values, std::uintptr_t order, std::uintptr_t sorted_index,
                     int64_t count, int64_t dim, double momentum, bool normalize, const std::string& reduce,
                     const std::string& dtype, std::uintptr_t scratch, std::uintptr_t stream_handle) {
  require(count >= 0 && dim >= 0, "cuda_ema_update: sizes must be non-negative");
  if (count == 0 || dim == 0) return;
  require(bank != 0 && values != 0 && order != 0 && sorted_index != 0, "cuda_ema_update: null pointer");
  const int code = reduce_code(reduce);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (dtype == "float32") {
    dispatch_values_per_lane<float, float>(bank, values, order, sorted_index, count, dim, momentum, normalize, code,
                                           scratch, stream);
  } else if (dtype == "float64") {
    dispatch_values_per_lane<double, double>(bank, values, order, sorted_index, count, dim, momentum, normalize,
                                             code, scratch, stream);
  } else if (dtype == "float16") {
    dispatch_values_per_lane<__half, float>(bank, values, order, sorted_index, count, dim, momentum, normalize, code,
                                            scratch, stream);
  } else if (dtype == "bfloat16") {
    dispatch_values_per_lane<__nv_bfloat16, float>(bank, values, order, sorted_index, count, dim, momentum,
                                                   normalize, code, scratch, stream);
  } else {
    throw std::invalid_argument("cuda_ema_update: dtype must be float32, float64, float16 or bfloat16, got " +
                                dtype);
  }
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("cuda_ema_update: kernel launch failed: ") + cudaGetErrorString(status));
  }
}

}  // namespace

void register_cuda_memory(py::module_& m) {
  m.def("cuda_ema_update", &cuda_ema_update, py::arg("bank"), py::arg("values"), py::arg("order"),
        py::arg("sorted_index"), py::arg("count"), py::arg("dim"), py::arg("momentum"), py::arg("normalize"),
        py::arg("reduce"), py::arg("dtype"), py::arg("scratch"), py::arg("stream"),
        "In-place memory EMA on the GPU, one warp per distinct row (see csrc/cuda/memory.cu).\n\n"
        "bank [M, D] and values [B, D] (dtype 'float32'|'float64'|'float16'|'bfloat16', contiguous),\n"
        "order [B] int64 (stable argsort of index) and sorted_index [B] int64 (index[order]) are\n"
        "device pointers; scratch: 0 when D <= 2048, else a device buffer of B * 2 * ceil(D / 32) * 32\n"
        "float32 (float64 for float64 banks); stream: cudaStream_t as an int (torch's current stream).\n"
        "Asynchronous: returns after the launch.");
}

}  // namespace fastassoc
