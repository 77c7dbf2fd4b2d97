// What the two halves of the linear kernels share: linear.cpp checks a call's tensors and prepares
// its activations, tiles.cpp computes it; between them travel the weight format, the argument
// block below, the output store and the parallel loop over output rows.
#pragma once

#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace glm {

enum Fmt { kInt4 = 0, kInt8 = 1, kF16 = 2, kBf16 = 3 };

struct LinArgs {
  const uint8_t* w = nullptr;  // weight bytes, row n starts at w + n * w_row_bytes
  int64_t w_row_bytes = 0;
  const float* scale = nullptr;  // [N] fp32 or nullptr (half weights)
  const float* bias = nullptr;   // [N] fp32 or nullptr
  const float* x0 = nullptr;     // fp32 activations: int4 -> x_even [M, K/2]; else x [M, K]
  const float* x1 = nullptr;     // int4 -> x_odd [M, K/2]
  const uint16_t* xb = nullptr;  // bf16 activations [M, K] (dpbf16 path); int4: x_even [M, K/2]
  const uint16_t* xb1 = nullptr;  // int4 dpbf16 path: bf16 x_odd [M, K/2]
  const float* xf = nullptr;     // natural-order fp32 x [M, K] (scalar path)
  const int8_t* xq0 = nullptr;   // int8-activation path: x_even [M, K/2] quantized per row
  const int8_t* xq1 = nullptr;   //                       x_odd  [M, K/2]
  const int32_t* xsum = nullptr;  //                      sum of row m's int8 values [M]
  const float* xscale = nullptr;  //                      row m's activation scale [M]
  int64_t ldx = 0;               // row stride (elements) of the prepared activations
  int64_t lanes = 0;             // k extent of one row in the prepared layout (K, or K/2 de-interleaved)
  int64_t M = 0, N = 0, K = 0;
  void* y = nullptr;  // [M, N] fp32 or bf16
  bool y_bf16 = false;
};

// y[m, n] from the finished dot product: times the row's scale, plus its bias (mul, then add).
inline void store_out(const LinArgs& a, int64_t m, int64_t n, float acc) {
  float v = acc;
  if (a.scale) v *= a.scale[n];
  if (a.bias) v += a.bias[n];
  if (a.y_bf16)
    reinterpret_cast<c10::BFloat16*>(a.y)[m * a.N + n] = c10::BFloat16(v);  // round-nearest-even
  else
    reinterpret_cast<float*>(a.y)[m * a.N + n] = v;
}

// int8-activation path: (sum of u * x with u = q + 8) -> y. The integer is exact and below 2^24
// in magnitude for K <= 16384 (8 * 127 * K), so its conversion to float is exact too.
inline void store_i8(const LinArgs& a, int64_t m, int64_t n, int32_t biased_sum) {
  store_out(a, m, n, static_cast<float>(biased_sum - 8 * a.xsum[m]) * a.xscale[m]);
}

// Runs f(begin, end) over [0, n) on torch's intra-op pool with dynamic scheduling: the range is
// cut into ~8 chunks per thread (each >= grain) that threads claim from an atomic counter. On a
// busy machine a descheduled thread then delays the call by at most one chunk instead of holding
// a fixed half of the work. Which thread computes a row never changes its result (rows are never
// split along k).
template <class F>
void dyn_parallel(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  const int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(std::max<int64_t>(1, grain), (n + 8 * nt - 1) / (8 * nt));
  const int64_t nchunks = (n + chunk - 1) / chunk;
  if (nt <= 1 || nchunks <= 1) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(nt, nchunks), 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks) break;
      f(c * chunk, std::min(n, (c + 1) * chunk));
    }
  });
}

// The vector kernels of tiles.cpp, by the form linear.cpp prepared the activations in.
enum class Tiles {
  kFp32Avx2,    // fp32 x0 (/ x1 for int4), any weight format
  kFp32Avx512,  // the same, 16 lanes
  kBf16,        // bf16 xb, int8 or bf16 weights (VDPBF16PS)
  kBf16Int4,    // bf16 xb / xb1 de-interleaved, int4 weights (VDPBF16PS)
  kInt8Vnni,    // int8 xq0 / xq1 de-interleaved, int4 weights (VPDPBUSD)
};

// y = the tiles of `kind` over all of a's rows (x86 only; the caller checked the ISA path).
void run_tiles(Tiles kind, Fmt fmt, const LinArgs& a);

}  // namespace glm
