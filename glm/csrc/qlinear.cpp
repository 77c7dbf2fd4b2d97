// Fused CPU kernels for THUDM ChatGLM weight-only quantized linear layers.
//
// Weight formats (see FORMATS.md sections 2-5), read in place (no repacking):
//   int8: qweight int8 [N, K], W[i,k] = qweight[i,k] * scale[i]
//   int4: qweight int8 [N, K/2]; byte b = qweight[i,j]: W[i,2j] = scale[i]*(b >> 4),
//         W[i,2j+1] = scale[i]*((int8)(b << 4) >> 4)   (both signed nibbles)
//   half: weight fp16 / bf16 [N, K] (un-quantized output layer)
// y[m, n] = sum_k x[m,k] * W[n,k] (+ bias[n]), fp32 accumulation, output in x's dtype.
//
// Code paths, chosen at run time (one build never executes unsupported instructions; the
// env var GLM_KERNEL_ISA or set_isa() can force a lower one, e.g. for tests):
//   avx512bf16 : bf16 activations x int4/int8/bf16 weights with VDPBF16PS (weights decoded to
//                bf16 exactly: small integers; products exact, fp32 accumulation). int4 (every
//                M) uses de-interleaved bf16 x_even / x_odd (2x VPERMW per 32 bytes).
//                Everything else as avx512.
//   avx512     : fp32 FMA; int4 nibbles decoded with a 16-entry VPERMPS table lookup, x
//                de-interleaved once per call into x_even / x_odd so no shuffles are needed
//   avx2       : fp32 FMA with AVX2+FMA+F16C
//   (int4_linear_i8, opt-in: int8 activations x int4 weights with VPDPBUSD when the CPU has AVX-512
//    VNNI and the ISA is avx512 or above, else the same integer sums in scalar code)
//   scalar     : portable C++
// Work is split over output rows on torch's intra-op pool (at::parallel_for, dynamic chunks).
// Each tile decodes a block of R weight rows once per k-step and FMAs it into the accumulators
// of MT activation rows; the next tile's weights are software-prefetched.
//
// BATCH INVARIANCE (product requirement): output row m depends only on x[m] and the weights,
// bitwise, whatever M, the row's position, its neighbours and the thread count (the engine
// batches the decode step of concurrent requests; tests/test_kernels.py::test_batch_invariant).
// So within one ISA path every tile shape (R x MT, full or row/token tail) computes each
// (row, token) dot product with exactly the same operations in the same order: ONE vector
// accumulator per (row, token), the same k-steps (lane layout, masked tail), the same horizontal
// reduction, then scale and bias in store_out (mul, then add). Tile shapes only choose how many
// such independent dot products run side by side. Never add per-M variants of the arithmetic
// (split accumulators, a different x layout for some M, ...). The build uses
// -ffp-contract=off (glm/kernels.py) so the compiler cannot fuse plain C++ mul+add differently
// in different instantiations; FMAs are explicit intrinsics.

#include <torch/extension.h>

#include "common.h"
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>


namespace {

enum Fmt { F_INT4 = 0, F_INT8 = 1, F_F16 = 2, F_BF16 = 3 };
enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512BF16 = 3 };
const char* kIsaNames[] = {"scalar", "avx2", "avx512", "avx512bf16"};

// ----------------------------------------------------------------------------------------------
// CPU feature detection
// ----------------------------------------------------------------------------------------------
int detect_isa() {
#ifdef GLM_X86
  __builtin_cpu_init();
  unsigned a = 0, b = 0, c = 0, d = 0;
  bool f16c = false;
  if (__get_cpuid(1, &a, &b, &c, &d)) f16c = (c >> 29) & 1u;
  // __builtin_cpu_supports also checks that the OS enabled the AVX / AVX-512 register state.
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return ISA_AVX512BF16;
  if (avx512) return ISA_AVX512;
  if (avx2) return ISA_AVX2;
#endif
  return ISA_SCALAR;
}

const int g_max_isa = detect_isa();

bool detect_vnni() {
#ifdef GLM_X86
  return g_max_isa >= ISA_AVX512 && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}
const bool g_has_vnni = detect_vnni();

int initial_isa() {
  int isa = g_max_isa;
  if (const char* env = std::getenv("GLM_KERNEL_ISA")) {
    for (int i = 0; i < 4; ++i)
      if (std::strcmp(env, kIsaNames[i]) == 0) isa = std::min(i, g_max_isa);
  }
  return isa;
}

std::atomic<int> g_isa{initial_isa()};

// ----------------------------------------------------------------------------------------------
// Shared argument block and output store
// ----------------------------------------------------------------------------------------------
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
  int64_t ldx = 0;               // row stride (elements) of x0 / x1 / xb
  int64_t lanes = 0;             // k extent in the x0 layout (K/2 for int4 fp32 paths, else K)
  int64_t M = 0, N = 0, K = 0;
  void* y = nullptr;  // [M, N] fp32 or bf16
  bool y_bf16 = false;
};

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

using TileFn = void (*)(const LinArgs&, int64_t n0, int64_t m0);

// Software prefetch of the NEXT tile's weight rows while this tile streams its own: the tile
// consumes R * row_bytes contiguous bytes, but as R short interleaved streams that the hardware
// prefetcher keeps losing at tile boundaries. Prefetching the next tile linearly (the same number
// of bytes per k-step as consumed) keeps the DRAM pipe full. Prefetches never fault. Into L2
// (T1), not L1 (T0): measured on Zen 4, decode steps at M = 1 took 12-28% less time (int4 with
// fp32 / bf16 / int8 x) and 17% less at M = 8 with int8 x; prefetching two tiles ahead did not help.
template <int BYTES>
inline void prefetch_span(const uint8_t* p) {
#ifdef GLM_X86
  for (int o = 0; o < BYTES; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T1);
#else
  (void)p;
#endif
}
// The tile's next neighbour (rows n0 + R ...) is prefetched while the tile runs. With M > MT the
// tile runs in np = ceil(M / MT) passes over the same weight rows, and each pass prefetches its
// 1/np share of the next tile (one span every np-th k-step), so DRAM streams during every pass
// instead of idling in all but the first (int4 x int8 decode step at M = 8: 235 -> 185 ms).
struct NextTilePrefetch {
  const uint8_t* p;
  int64_t np, phase = 0;
  NextTilePrefetch(const LinArgs& a, int64_t n0, int64_t m0, int R, int MT)
      : np((a.M + MT - 1) / MT) {
    p = a.w + (n0 + R) * a.w_row_bytes + (m0 / MT) * (R * a.w_row_bytes / np);
  }
  // Where to prefetch `span` bytes at this k-step, or nullptr on steps without a prefetch.
  const uint8_t* step(int64_t span) {
    if (phase != 0) {
      --phase;
      return nullptr;
    }
    phase = np - 1;
    const uint8_t* q = p;
    p += span;
    return q;
  }
};

constexpr int kMaxMT = 8;

struct Plan {
  int R = 1;   // weight rows per tile
  int MT = 1;  // activation rows per tile
  TileFn full[kMaxMT + 1] = {};   // full[mt]: R rows x mt activation rows
  TileFn single[kMaxMT + 1] = {};  // single[mt]: 1 row (row tail)
};

template <template <int, int, int> class T, int FMT, int R, int... Ms>
void fill_tab(TileFn* tab, std::integer_sequence<int, Ms...>) {
  ((tab[Ms + 1] = &T<FMT, R, Ms + 1>::run), ...);
}

template <template <int, int, int> class T, int FMT, int R, int MT>
Plan make_plan() {
  Plan p;
  p.R = R;
  p.MT = MT;
  fill_tab<T, FMT, R>(p.full, std::make_integer_sequence<int, MT>{});
  fill_tab<T, FMT, 1>(p.single, std::make_integer_sequence<int, kMaxMT>{});
  return p;
}

// Runs f(begin, end) over [0, n) on torch's intra-op pool with dynamic scheduling: the range is
// cut into ~8 chunks per thread (each >= grain) that threads claim from an atomic counter. On a
// busy machine a descheduled thread then delays the call by at most one chunk instead of holding
// a fixed half of the work (static splitting made every call wait for the slowest thread).
// Which thread computes a row never changes its result (rows are never split along k).
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

void drive(const LinArgs& a, const Plan& p) {
  const int64_t R = p.R;
  const int64_t nblk = (a.N + R - 1) / R;
  // Enough work per chunk that small layers are not split into tiny pieces.
  const int64_t blk_bytes = std::max<int64_t>(1, R * a.w_row_bytes * std::max<int64_t>(1, a.M / 4));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / blk_bytes);
  dyn_parallel(nblk, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * R;
      const int64_t rows = std::min<int64_t>(R, a.N - n0);
      for (int64_t m0 = 0; m0 < a.M; m0 += p.MT) {
        const int mt = (int)std::min<int64_t>(p.MT, a.M - m0);
        if (rows == R) {
          p.full[mt](a, n0, m0);
        } else {
          for (int64_t r = 0; r < rows; ++r) p.single[mt](a, n0 + r, m0);
        }
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------
// Scalar path (portable). Decodes one weight row into fp32 once, then dots it with every x row.
// ----------------------------------------------------------------------------------------------
inline void decode_row_scalar(int fmt, const uint8_t* row, int64_t K, float* out) {
  switch (fmt) {
    case F_INT4:
      for (int64_t j = 0; j < K / 2; ++j) {
        const int8_t b = static_cast<int8_t>(row[j]);
        out[2 * j] = static_cast<float>(b >> 4);
        out[2 * j + 1] = static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4);
      }
      break;
    case F_INT8:
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(static_cast<int8_t>(row[k]));
      break;
    case F_F16: {
      const c10::Half* h = reinterpret_cast<const c10::Half*>(row);
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(h[k]);
      break;
    }
    default: {
      const c10::BFloat16* h = reinterpret_cast<const c10::BFloat16*>(row);
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(h[k]);
      break;
    }
  }
}

void linear_scalar(int fmt, const LinArgs& a) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, a.w_row_bytes));
  dyn_parallel(a.N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<float> wrow(static_cast<size_t>(a.K));
    for (int64_t n = n0; n < n1; ++n) {
      decode_row_scalar(fmt, a.w + n * a.w_row_bytes, a.K, wrow.data());
      for (int64_t m = 0; m < a.M; ++m) {
        const float* x = a.xf + m * a.K;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t k = 0;
        for (; k + 8 <= a.K; k += 8)
          for (int u = 0; u < 8; ++u) acc[u] += wrow[k + u] * x[k + u];
        for (; k < a.K; ++k) acc[0] += wrow[k] * x[k];
        float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        store_out(a, m, n, s);
      }
    }
  });
}

#ifdef GLM_X86
// Scalar int4 x int8-activation path: the same integer sums as TileVnni, so the same bits.
void linear_i8_scalar(const LinArgs& a) {
  const int64_t Kb = a.w_row_bytes;
  dyn_parallel(a.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = a.w + n * Kb;
      for (int64_t m = 0; m < a.M; ++m) {
        const int8_t* xe = a.xq0 + m * a.ldx;
        const int8_t* xo = a.xq1 + m * a.ldx;
        int32_t acc = 0;
        for (int64_t j = 0; j < Kb; ++j) {
          acc += ((row[j] >> 4) ^ 8) * int32_t(xe[j]);
          acc += ((row[j] & 0x0F) ^ 8) * int32_t(xo[j]);
        }
        store_i8(a, m, n, acc);
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C path (fp32 FMA, 8 lanes). k tail handled in scalar code.
// ----------------------------------------------------------------------------------------------
template <int FMT>
AVX2_FN inline void dec256(const uint8_t* row, int64_t l, __m256* w) {
  if constexpr (FMT == F_INT4) {
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + l)));
    w[0] = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 4));
    w[1] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28));
  } else if constexpr (FMT == F_INT8) {
    w[0] = _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + l))));
  } else if constexpr (FMT == F_F16) {
    w[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * l)));
  } else {
    w[0] = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * l))), 16));
  }
}

inline void dec_lane_scalar(int fmt, const uint8_t* row, int64_t l, float* w) {
  if (fmt == F_INT4) {
    const int8_t b = static_cast<int8_t>(row[l]);
    w[0] = static_cast<float>(b >> 4);
    w[1] = static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4);
  } else if (fmt == F_INT8) {
    w[0] = static_cast<float>(static_cast<int8_t>(row[l]));
  } else if (fmt == F_F16) {
    w[0] = static_cast<float>(reinterpret_cast<const c10::Half*>(row)[l]);
  } else {
    w[0] = static_cast<float>(reinterpret_cast<const c10::BFloat16*>(row)[l]);
  }
}

AVX2_FN inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int FMT, int R, int MT>
struct Tile256 {
  AVX2_FN __attribute__((noinline)) static void run(const LinArgs& a, int64_t n0, int64_t m0) {
    constexpr int NV = FMT == F_INT4 ? 2 : 1;
    __m256 acc[R][MT];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
    const uint8_t* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = a.w + (n0 + r) * a.w_row_bytes;
    const float* xs[2] = {a.x0 + m0 * a.ldx, (NV == 2 ? a.x1 : a.x0) + m0 * a.ldx};
    const int64_t L = a.lanes;
    constexpr int BPL = (FMT == F_F16 || FMT == F_BF16) ? 2 : 1;  // weight bytes per lane
    NextTilePrefetch next(a, n0, m0, R, MT);
    int64_t l = 0;
    for (; l + 8 <= L; l += 8) {
      if (const uint8_t* pf = next.step(R * 8 * BPL)) prefetch_span<R * 8 * BPL>(pf);
      __m256 w[R][NV];
      for (int r = 0; r < R; ++r) dec256<FMT>(wr[r], l, w[r]);
      for (int m = 0; m < MT; ++m)
        for (int v = 0; v < NV; ++v) {
          const __m256 xv = _mm256_loadu_ps(xs[v] + m * a.ldx + l);
          for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(w[r][v], xv, acc[r][m]);
        }
    }
    float tail[R][MT];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) tail[r][m] = 0.f;
    for (; l < L; ++l) {
      for (int r = 0; r < R; ++r) {
        float w[2];
        dec_lane_scalar(FMT, wr[r], l, w);
        for (int m = 0; m < MT; ++m)
          for (int v = 0; v < NV; ++v) tail[r][m] += w[v] * xs[v][m * a.ldx + l];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) store_out(a, m0 + m, n0 + r, hsum256(acc[r][m]) + tail[r][m]);
  }
};

// ----------------------------------------------------------------------------------------------
// AVX-512 fp32 path (16 lanes). int4: nibble -> float via VPERMPS on a 16-entry table.
// ----------------------------------------------------------------------------------------------
template <int FMT, bool TAIL>
AVX512_FN inline void dec512(const uint8_t* row, int64_t l, __mmask16 mk, __m512* w) {
  if constexpr (FMT == F_INT4) {
    const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    const __m128i b = TAIL ? _mm_maskz_loadu_epi8(mk, row + l)
                           : _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + l));
    const __m512i v = _mm512_cvtepu8_epi32(b);
    w[0] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);  // high nibble -> even column
    w[1] = _mm512_permutexvar_ps(v, lut);                        // low nibble  -> odd column
  } else if constexpr (FMT == F_INT8) {
    const __m128i b = TAIL ? _mm_maskz_loadu_epi8(mk, row + l)
                           : _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + l));
    w[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  } else if constexpr (FMT == F_F16) {
    const __m256i h = TAIL ? _mm256_maskz_loadu_epi16(mk, row + 2 * l)
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * l));
    w[0] = _mm512_cvtph_ps(h);
  } else {
    const __m256i h = TAIL ? _mm256_maskz_loadu_epi16(mk, row + 2 * l)
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * l));
    w[0] = widen_bf16(h);
  }
}

template <int FMT, int R, int MT>
struct Tile512 {
  AVX512_FN __attribute__((noinline)) static void run(const LinArgs& a, int64_t n0, int64_t m0) {
    constexpr int NV = FMT == F_INT4 ? 2 : 1;
    __m512 acc[R][MT];  // one accumulator per (row, token): see BATCH INVARIANCE
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
    const uint8_t* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = a.w + (n0 + r) * a.w_row_bytes;
    const float* xs[2] = {a.x0 + m0 * a.ldx, (NV == 2 ? a.x1 : a.x0) + m0 * a.ldx};
    const int64_t L = a.lanes;
    const int64_t ldx = a.ldx;
    constexpr int BPL = (FMT == F_F16 || FMT == F_BF16) ? 2 : 1;  // weight bytes per lane
    NextTilePrefetch next(a, n0, m0, R, MT);
    int64_t l = 0;
    for (; l + 16 <= L; l += 16) {
      if (const uint8_t* pf = next.step(R * 16 * BPL)) prefetch_span<R * 16 * BPL>(pf);
      __m512 w[R][NV];
      for (int r = 0; r < R; ++r) dec512<FMT, false>(wr[r], l, 0xFFFF, w[r]);
      for (int m = 0; m < MT; ++m)
        for (int v = 0; v < NV; ++v) {
          const __m512 xv = _mm512_loadu_ps(xs[v] + m * ldx + l);
          for (int r = 0; r < R; ++r)
            acc[r][m] = _mm512_fmadd_ps(w[r][v], xv, acc[r][m]);
        }
    }
    if (l < L) {
      const __mmask16 mk = static_cast<__mmask16>((1u << (L - l)) - 1u);
      __m512 w[R][NV];
      for (int r = 0; r < R; ++r) dec512<FMT, true>(wr[r], l, mk, w[r]);
      for (int m = 0; m < MT; ++m)
        for (int v = 0; v < NV; ++v) {
          const __m512 xv = _mm512_maskz_loadu_ps(mk, xs[v] + m * ldx + l);
          for (int r = 0; r < R; ++r)
            acc[r][m] = _mm512_fmadd_ps(w[r][v], xv, acc[r][m]);
        }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) store_out(a, m0 + m, n0 + r, _mm512_reduce_add_ps(acc[r][m]));
  }
};

// ----------------------------------------------------------------------------------------------
// AVX-512 BF16 path: bf16 activations, VDPBF16PS on (w[2i], w[2i+1]) x (x[2i], x[2i+1]) pairs.
// Each k-step covers 32 consecutive k. Weights are decoded to bf16 exactly (integers |q| <= 128).
// ----------------------------------------------------------------------------------------------
alignas(64) const uint16_t kNibbleBf16[32] = {
    // bf16 bit patterns of the signed nibble values 0..7, -8..-1, twice (VPERMW uses 5 index bits)
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80};

template <int FMT, bool TAIL>
AVX512BF16_FN inline __m512i decbf(const uint8_t* row, int64_t e, int64_t rem, __m512i lut) {
  if constexpr (FMT == F_INT4) {
    const __mmask16 mk = TAIL ? static_cast<__mmask16>((1u << (rem / 2)) - 1u) : 0xFFFF;
    const __m128i b = TAIL ? _mm_maskz_loadu_epi8(mk, row + e / 2)
                           : _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + e / 2));
    const __m512i v = _mm512_cvtepu8_epi32(b);
    // dword j: low word index = high nibble (column 2j), high word index = byte (low 5 bits;
    // table repeats so only the low nibble matters) -> column 2j+1.
    const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(v, 4), _mm512_slli_epi32(v, 16));
    return _mm512_permutexvar_epi16(idx, lut);
  } else if constexpr (FMT == F_INT8) {
    const __mmask32 mk = TAIL ? static_cast<__mmask32>((1ull << rem) - 1ull) : 0xFFFFFFFFu;
    const __m256i b = TAIL ? _mm256_maskz_loadu_epi8(mk, row + e)
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + e));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  } else {  // bf16 weights
    const __mmask32 mk = TAIL ? static_cast<__mmask32>((1ull << rem) - 1ull) : 0xFFFFFFFFu;
    return TAIL ? _mm512_maskz_loadu_epi16(mk, row + 2 * e)
                : _mm512_loadu_si512(reinterpret_cast<const void*>(row + 2 * e));
  }
}

// Weight bytes per 32 k-values: int4 16, int8 32, bf16 64.
template <int FMT>
constexpr int kBytesPer32 = FMT == F_INT4 ? 16 : (FMT == F_INT8 ? 32 : 64);

template <int FMT, int R, int MT>
AVX512BF16_FN inline void stepbf(const uint8_t* const* wr, const uint16_t* xb, int64_t ldx, int64_t e,
                                 __m512i lut, const uint8_t* pf, __m512 (&acc)[R][MT]) {
  if (pf) prefetch_span<R * kBytesPer32<FMT>>(pf);
  __m512i w[R];
  for (int r = 0; r < R; ++r) w[r] = decbf<FMT, false>(wr[r], e, 0, lut);
  for (int m = 0; m < MT; ++m) {
    const __m512i xv = _mm512_loadu_si512(reinterpret_cast<const void*>(xb + m * ldx + e));
    for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w[r], (__m512bh)xv);
  }
}

template <int FMT, int R, int MT>
struct TileBf16 {
  AVX512BF16_FN __attribute__((noinline)) static void run(const LinArgs& a, int64_t n0, int64_t m0) {
    __m512 acc[R][MT];  // one accumulator per (row, token): see BATCH INVARIANCE
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
    const __m512i lut = _mm512_load_si512(reinterpret_cast<const void*>(kNibbleBf16));
    const uint8_t* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = a.w + (n0 + r) * a.w_row_bytes;
    const uint16_t* xb = a.xb + m0 * a.ldx;
    const int64_t ldx = a.ldx;
    const int64_t K = a.K;
    NextTilePrefetch next(a, n0, m0, R, MT);
    int64_t e = 0;
    for (; e + 32 <= K; e += 32) stepbf<FMT, R, MT>(wr, xb, ldx, e, lut, next.step(R * kBytesPer32<FMT>), acc);
    if (e < K) {
      const int64_t rem = K - e;
      const __mmask32 mk = static_cast<__mmask32>((1ull << rem) - 1ull);
      __m512i w[R];
      for (int r = 0; r < R; ++r) w[r] = decbf<FMT, true>(wr[r], e, rem, lut);
      for (int m = 0; m < MT; ++m) {
        const __m512i xv = _mm512_maskz_loadu_epi16(mk, xb + m * ldx + e);
        for (int r = 0; r < R; ++r)
          acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w[r], (__m512bh)xv);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) store_out(a, m0 + m, n0 + r, _mm512_reduce_add_ps(acc[r][m]));
  }
};

// int4 x bf16 activations, de-interleaved: 32 weight bytes -> VPMOVZXBW gives one byte per word;
// VPERMW on the low 5 bits (table repeats every 16) yields the 32 low nibbles (odd columns) as
// bf16, and after VPSRLW 4 the 32 high nibbles (even columns). VDPBF16PS then pairs them with
// 32 consecutive bf16 x_odd / x_even values: 4 decode ops + 2 dot ops per 64 weights.
template <int R, int MT, bool TAIL>
AVX512BF16_FN inline void stepbf_i4(const uint8_t* const* wr, const uint16_t* xe, const uint16_t* xo,
                                    int64_t ldx, int64_t j, __mmask32 mk, __m512i lut,
                                    const uint8_t* pf, __m512 (&acc)[R][MT]) {
  if (pf) prefetch_span<R * 32>(pf);
  __m512i hi[R], lo[R];
  for (int r = 0; r < R; ++r) {
    const __m256i b = TAIL ? _mm256_maskz_loadu_epi8(mk, wr[r] + j)
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[r] + j));
    const __m512i v = _mm512_cvtepu8_epi16(b);
    lo[r] = _mm512_permutexvar_epi16(v, lut);
    hi[r] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
  }
  for (int m = 0; m < MT; ++m) {
    const __m512i ve = TAIL ? _mm512_maskz_loadu_epi16(mk, xe + m * ldx + j)
                            : _mm512_loadu_si512(reinterpret_cast<const void*>(xe + m * ldx + j));
    for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)hi[r], (__m512bh)ve);
    const __m512i vo = TAIL ? _mm512_maskz_loadu_epi16(mk, xo + m * ldx + j)
                            : _mm512_loadu_si512(reinterpret_cast<const void*>(xo + m * ldx + j));
    for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)lo[r], (__m512bh)vo);
  }
}

template <int FMT_UNUSED, int R, int MT>
struct TileBf16I4 {
  AVX512BF16_FN __attribute__((noinline)) static void run(const LinArgs& a, int64_t n0, int64_t m0) {
    __m512 acc[R][MT];  // one accumulator per (row, token): see BATCH INVARIANCE
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
    const __m512i lut = _mm512_load_si512(reinterpret_cast<const void*>(kNibbleBf16));
    const uint8_t* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = a.w + (n0 + r) * a.w_row_bytes;
    const uint16_t* xe = a.xb + m0 * a.ldx;
    const uint16_t* xo = a.xb1 + m0 * a.ldx;
    const int64_t ldx = a.ldx;
    const int64_t Kb = a.w_row_bytes;
    NextTilePrefetch next(a, n0, m0, R, MT);
    int64_t j = 0;
    for (; j + 32 <= Kb; j += 32)
      stepbf_i4<R, MT, false>(wr, xe, xo, ldx, j, 0xFFFFFFFFu, lut, next.step(R * 32), acc);
    if (j < Kb) {
      const __mmask32 mk = static_cast<__mmask32>((1ull << (Kb - j)) - 1ull);
      stepbf_i4<R, MT, true>(wr, xe, xo, ldx, j, mk, lut, nullptr, acc);
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) store_out(a, m0 + m, n0 + r, _mm512_reduce_add_ps(acc[r][m]));
  }
};

// ----------------------------------------------------------------------------------------------
// AVX-512 VNNI path: int4 weights x int8 activations (quantized per row by int4_linear_i8).
// VPDPBUSD multiplies unsigned by signed bytes, so nibbles are biased to u = q + 8 in [0, 15]
// (one VPTERNLOG: (byte & 0x0F) ^ 0x08) and the bias is removed at the end: sum(q x) =
// sum(u x) - 8 sum(x). Integer sums are exact, so any tiling gives the same bits.
// ----------------------------------------------------------------------------------------------
template <int R, int MT, bool TAIL>
AVX512VNNI_FN inline void step_vnni(const uint8_t* const* wr, const int8_t* xe, const int8_t* xo, int64_t ldx,
                                    int64_t j, __mmask64 mk, const uint8_t* pf, __m512i (&acc)[R][MT]) {
  if (pf) prefetch_span<R * 64>(pf);
  const __m512i low4 = _mm512_set1_epi8(0x0F), bias8 = _mm512_set1_epi8(0x08);
  __m512i hi[R], lo[R];
  for (int r = 0; r < R; ++r) {
    const __m512i b = TAIL ? _mm512_maskz_loadu_epi8(mk, wr[r] + j)
                           : _mm512_loadu_si512(reinterpret_cast<const void*>(wr[r] + j));
    lo[r] = _mm512_ternarylogic_epi32(b, low4, bias8, 0x6A);                          // odd columns
    hi[r] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(b, 4), low4, bias8, 0x6A);    // even columns
  }
  for (int m = 0; m < MT; ++m) {
    const __m512i ve = TAIL ? _mm512_maskz_loadu_epi8(mk, xe + m * ldx + j)
                            : _mm512_loadu_si512(reinterpret_cast<const void*>(xe + m * ldx + j));
    const __m512i vo = TAIL ? _mm512_maskz_loadu_epi8(mk, xo + m * ldx + j)
                            : _mm512_loadu_si512(reinterpret_cast<const void*>(xo + m * ldx + j));
    for (int r = 0; r < R; ++r) {
      acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], hi[r], ve);
      acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], lo[r], vo);
    }
  }
}

template <int FMT_UNUSED, int R, int MT>
struct TileVnni {
  AVX512VNNI_FN __attribute__((noinline)) static void run(const LinArgs& a, int64_t n0, int64_t m0) {
    __m512i acc[R][MT];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_si512();
    const uint8_t* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = a.w + (n0 + r) * a.w_row_bytes;
    const int8_t* xe = a.xq0 + m0 * a.ldx;
    const int8_t* xo = a.xq1 + m0 * a.ldx;
    const int64_t Kb = a.w_row_bytes;
    NextTilePrefetch next(a, n0, m0, R, MT);
    int64_t j = 0;
    for (; j + 64 <= Kb; j += 64) step_vnni<R, MT, false>(wr, xe, xo, a.ldx, j, ~0ull, next.step(R * 64), acc);
    if (j < Kb) step_vnni<R, MT, true>(wr, xe, xo, a.ldx, j, (1ull << (Kb - j)) - 1ull, nullptr, acc);
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) store_i8(a, m0 + m, n0 + r, _mm512_reduce_add_epi32(acc[r][m]));
  }
};

#endif  // GLM_X86

// ----------------------------------------------------------------------------------------------
// Plans per (isa, format, M)
// ----------------------------------------------------------------------------------------------
#ifdef GLM_X86
// Tile shapes per M (measured on Zen 4, see bench/kernels.py --cpu). They change speed only,
// never a row's arithmetic (see BATCH INVARIANCE). For M > 4 the activation block no longer fits
// L1, so more weight rows per tile share each x load: fp32 x uses 4 rows x 4 tokens (16 fp32
// accumulators), bf16 x with int8/bf16 weights 3 rows x 8 tokens (24 accumulators, 1 register per
// decoded row); int4 x bf16 (2 registers per decoded row) 4 x 4 (3x8, 2x8, 3x6, 4x5 measured
// slower at M = 8, 16).
template <template <int, int, int> class T, int FMT, int RB, int MB>
struct PlanSet {
  Plan m1, m2, m4, mb;
  PlanSet()
      : m1(make_plan<T, FMT, 4, 1>()),
        m2(make_plan<T, FMT, 4, 2>()),
        m4(make_plan<T, FMT, 4, 4>()),
        mb(make_plan<T, FMT, RB, MB>()) {}
  const Plan& pick(int64_t M) const {
    if (M <= 1) return m1;
    if (M == 2) return m2;
    if (M <= 4) return m4;
    return mb;
  }
};

template <template <int, int, int> class T, int RB, int MB>
struct PlanTable {
  PlanSet<T, F_INT4, RB, MB> i4;
  PlanSet<T, F_INT8, RB, MB> i8;
  PlanSet<T, F_F16, RB, MB> f16;
  PlanSet<T, F_BF16, RB, MB> bf16;
  const Plan& pick(int fmt, int64_t M) const {
    switch (fmt) {
      case F_INT4: return i4.pick(M);
      case F_INT8: return i8.pick(M);
      case F_F16: return f16.pick(M);
      default: return bf16.pick(M);
    }
  }
};

// AVX2 has 16 vector registers: smaller tiles.
template <template <int, int, int> class T, int FMT>
struct PlanSet256 {
  Plan m1, m4;
  PlanSet256() : m1(make_plan<T, FMT, 2, 1>()), m4(make_plan<T, FMT, 2, 4>()) {}
  const Plan& pick(int64_t M) const { return M <= 1 ? m1 : m4; }
};

struct PlanTable256 {
  PlanSet256<Tile256, F_INT4> i4;
  PlanSet256<Tile256, F_INT8> i8;
  PlanSet256<Tile256, F_F16> f16;
  PlanSet256<Tile256, F_BF16> bf16;
  const Plan& pick(int fmt, int64_t M) const {
    switch (fmt) {
      case F_INT4: return i4.pick(M);
      case F_INT8: return i8.pick(M);
      case F_F16: return f16.pick(M);
      default: return bf16.pick(M);
    }
  }
};

const PlanTable<Tile512, 4, 4>& plans512() {
  static const PlanTable<Tile512, 4, 4> t;
  return t;
}
const PlanSet<TileBf16I4, F_INT4, 4, 4>& plansbf16_i4() {
  static const PlanSet<TileBf16I4, F_INT4, 4, 4> t;
  return t;
}
const PlanSet<TileVnni, F_INT4, 4, 4>& plansvnni() {
  static const PlanSet<TileVnni, F_INT4, 4, 4> t;
  return t;
}
const PlanTable<TileBf16, 3, 8>& plansbf16() {
  static const PlanTable<TileBf16, 3, 8> t;  // the F16 entry is never used (fp16 weights take fp32 path)
  return t;
}
const PlanTable256& plans256() {
  static const PlanTable256 t;
  return t;
}
#endif

// ----------------------------------------------------------------------------------------------
// Tensor-level entry points
// ----------------------------------------------------------------------------------------------
bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "glm_qlinear: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "glm_qlinear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "glm_qlinear: x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "glm_qlinear: x must be contiguous");
}

const float* prep_vec(const c10::optional<at::Tensor>& t, int64_t N, const char* what,
                      at::Tensor& holder) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device().is_cpu(), "glm_qlinear: ", what, " must be a CPU tensor");
  TORCH_CHECK(is_float_dtype(t->scalar_type()), "glm_qlinear: ", what,
              " must be float16/bfloat16/float32, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == N, "glm_qlinear: ", what, " must have shape [", N,
              "], got ", t->sizes());
  holder = t->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

// What every entry point sets the same way: weights, scale and bias (as fp32, kept alive by the
// holders), shapes, and the output y [M, N] in x's dtype.
at::Tensor init_args(LinArgs& a, const at::Tensor& x, const at::Tensor& w, int64_t row_bytes,
                     const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
                     at::Tensor& scale_f, at::Tensor& bias_f) {
  a.M = x.size(0);
  a.K = x.size(1);
  a.N = w.size(0);
  a.scale = prep_vec(scale, a.N, "scale", scale_f);
  a.bias = prep_vec(bias, a.N, "bias", bias_f);
  a.w = reinterpret_cast<const uint8_t*>(w.data_ptr());
  a.w_row_bytes = row_bytes;
  at::Tensor y = at::empty({a.M, a.N}, x.options());
  a.y = y.data_ptr();
  a.y_bf16 = x.scalar_type() == at::kBFloat16;
  return y;
}

at::Tensor linear_impl(int fmt, const at::Tensor& x, const at::Tensor& w,
                       const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias) {
  check_x(x);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(w.device().is_cpu(), "glm_qlinear: weight must be a CPU tensor");
  TORCH_CHECK(w.dim() == 2, "glm_qlinear: weight must be 2-D, got shape ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "glm_qlinear: weight must be contiguous (row-major [N, K'])");
  const int64_t N = w.size(0);
  int64_t row_bytes = 0;
  if (fmt == F_INT4 || fmt == F_INT8) {
    TORCH_CHECK(w.scalar_type() == at::kChar, "glm_qlinear: qweight must be int8, got ", w.scalar_type());
    const int64_t expect = fmt == F_INT4 ? K / 2 : K;
    TORCH_CHECK(fmt != F_INT4 || K % 2 == 0, "glm_qlinear: int4 needs an even K, got K=", K);
    TORCH_CHECK(w.size(1) == expect, "glm_qlinear: ", fmt == F_INT4 ? "int4" : "int8",
                " qweight must be [N, ", expect, "] for x with K=", K, ", got ", w.sizes());
    row_bytes = expect;
    TORCH_CHECK(scale.has_value() && scale->defined(), "glm_qlinear: scale is required");
  } else {
    TORCH_CHECK(w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16,
                "glm_qlinear: half_linear weight must be float16 or bfloat16, got ", w.scalar_type());
    TORCH_CHECK(w.size(1) == K, "glm_qlinear: weight must be [N, ", K, "], got ", w.sizes());
    row_bytes = 2 * K;
    fmt = w.scalar_type() == at::kHalf ? F_F16 : F_BF16;
  }
  at::Tensor scale_f, bias_f;
  LinArgs a;
  at::Tensor y = init_args(a, x, w, row_bytes, scale, bias, scale_f, bias_f);
  if (M == 0 || N == 0) return y;

  const int isa = g_isa.load(std::memory_order_relaxed);
  const bool xbf = x.scalar_type() == at::kBFloat16;
  at::Tensor xf, xeo;
#ifdef GLM_X86
  if (isa >= ISA_AVX512BF16 && xbf && fmt == F_INT4) {
    // de-interleave the bf16 x once per call into x_even / x_odd (bf16, [M, K/2] each).
    // Used for EVERY M (batch invariance: the interleaved TileBf16 pairs different k-values per
    // VDPBF16PS, so its sums differ in rounding). The cheaper decode wins at small M where decode
    // dominates; at M > 4 the interleaved 3x8 tile was ~10% faster, the price of invariance.
    const int64_t Kh = K / 2;
    xeo = at::empty({2, M, Kh}, x.options());
    uint16_t* xe = reinterpret_cast<uint16_t*>(xeo.data_ptr());
    uint16_t* xo = xe + M * Kh;
    const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < Kh; ++j) {
        xe[m * Kh + j] = src[m * K + 2 * j];
        xo[m * Kh + j] = src[m * K + 2 * j + 1];
      }
    a.xb = xe;
    a.xb1 = xo;
    a.ldx = Kh;
    a.lanes = Kh;
    drive(a, plansbf16_i4().pick(M));
    return y;
  }
  if (isa >= ISA_AVX512BF16 && xbf && fmt != F_F16) {
    a.xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
    a.ldx = K;
    a.lanes = K;
    drive(a, plansbf16().pick(fmt, M));
    return y;
  }
#endif
  xf = xbf ? x.to(at::kFloat) : x;
  a.xf = xf.data_ptr<float>();
  if (isa == ISA_SCALAR) {
    linear_scalar(fmt, a);
    return y;
  }
#ifdef GLM_X86
  if (fmt == F_INT4) {
    // de-interleave once per call: x_even = x[:, 0::2], x_odd = x[:, 1::2]
    const int64_t Kh = K / 2;
    xeo = at::empty({2, M, Kh}, xf.options());
    float* xe = xeo.data_ptr<float>();
    float* xo = xe + M * Kh;
    const float* src = a.xf;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < Kh; ++j) {
        xe[m * Kh + j] = src[m * K + 2 * j];
        xo[m * Kh + j] = src[m * K + 2 * j + 1];
      }
    a.x0 = xe;
    a.x1 = xo;
    a.ldx = Kh;
    a.lanes = Kh;
  } else {
    a.x0 = a.xf;
    a.ldx = K;
    a.lanes = K;
  }
  if (isa >= ISA_AVX512)
    drive(a, plans512().pick(fmt, M));
  else
    drive(a, plans256().pick(fmt, M));
#endif
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  return linear_impl(F_INT4, x, qweight, scale, bias);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  return linear_impl(F_INT8, x, qweight, scale, bias);
}

// Row quantization for int4_linear_i8: s = max|x| / 127 (1 if the row is 0), q = round-half-even(x / s),
// split into even and odd columns. The AVX-512 version computes the same bits (IEEE division,
// the same rounding; max is exact in any order).
inline int8_t quantize_one(float v, float s) { return static_cast<int8_t>(std::nearbyint(v / s)); }

#ifdef GLM_X86
AVX512_FN void quantize_row_i8_avx512(const float* r, int64_t Kh, int8_t* xe, int8_t* xo, float& scale,
                                      int32_t& sum) {
  const int64_t K = 2 * Kh;
  __m512 vmax = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(r + k)));
  float amax = _mm512_reduce_max_ps(vmax);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(r[k]));
  const float s = amax > 0.f ? amax / 127.f : 1.f;
  const __m512 vs = _mm512_set1_ps(s);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  __m512i vsum = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 16 <= Kh; j += 16) {
    const __m512 a = _mm512_loadu_ps(r + 2 * j), b = _mm512_loadu_ps(r + 2 * j + 16);
    const __m512i e = _mm512_cvtps_epi32(
        _mm512_roundscale_ps(_mm512_div_ps(_mm512_permutex2var_ps(a, even, b), vs), _MM_FROUND_TO_NEAREST_INT));
    const __m512i o = _mm512_cvtps_epi32(
        _mm512_roundscale_ps(_mm512_div_ps(_mm512_permutex2var_ps(a, odd, b), vs), _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xe + j), _mm512_cvtepi32_epi8(e));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xo + j), _mm512_cvtepi32_epi8(o));
    vsum = _mm512_add_epi32(vsum, _mm512_add_epi32(e, o));
  }
  int32_t total = _mm512_reduce_add_epi32(vsum);
  for (; j < Kh; ++j) {
    xe[j] = quantize_one(r[2 * j], s);
    xo[j] = quantize_one(r[2 * j + 1], s);
    total += xe[j] + xo[j];
  }
  scale = s;
  sum = total;
}
#endif

void quantize_row_i8(const float* r, int64_t Kh, int8_t* xe, int8_t* xo, float& scale, int32_t& sum) {
#ifdef GLM_X86
  if (g_isa.load(std::memory_order_relaxed) >= ISA_AVX512) {
    quantize_row_i8_avx512(r, Kh, xe, xo, scale, sum);
    return;
  }
#endif
  float amax = 0.f;
  for (int64_t k = 0; k < 2 * Kh; ++k) amax = std::max(amax, std::fabs(r[k]));
  const float s = amax > 0.f ? amax / 127.f : 1.f;
  int32_t total = 0;
  for (int64_t j = 0; j < Kh; ++j) {
    xe[j] = quantize_one(r[2 * j], s);
    xo[j] = quantize_one(r[2 * j + 1], s);
    total += xe[j] + xo[j];
  }
  scale = s;
  sum = total;
}

// y = dequant(x_q) @ dequant(qweight).T + bias with x quantized per row to int8 (symmetric,
// scale = max|x| / 127, round half to even), integer dot products, one float rescale per output.
at::Tensor int4_linear_i8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias) {
  check_x(x);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "glm_qlinear: int4_linear_i8 needs float32 x, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 2 == 0 && K <= 16384, "glm_qlinear: int4_linear_i8 needs an even K <= 16384, got K=", K);
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous() &&
                  w.size(1) == K / 2,
              "glm_qlinear: qweight must be a contiguous int8 CPU tensor [N, ", K / 2, "], got ", w.sizes());
  const int64_t N = w.size(0), Kh = K / 2;
  at::Tensor scale_f, bias_f;
  LinArgs a;
  at::Tensor y = init_args(a, x, w, Kh, scale, bias, scale_f, bias_f);
  if (M == 0 || N == 0) return y;
  at::Tensor xq = at::empty({2, M, Kh}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({M}, x.options());
  at::Tensor xsum = at::empty({M}, x.options().dtype(at::kInt));
  int8_t* xe = xq.data_ptr<int8_t>();
  int8_t* xo = xe + M * Kh;
  const float* src = x.data_ptr<float>();
  float* xsp = xs.data_ptr<float>();
  int32_t* sump = xsum.data_ptr<int32_t>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_row_i8(src + m * K, Kh, xe + m * Kh, xo + m * Kh, xsp[m], sump[m]);
  });
  a.xq0 = xe;
  a.xq1 = xo;
  a.xsum = sump;
  a.xscale = xsp;
  a.ldx = Kh;
  a.lanes = Kh;
#ifdef GLM_X86
  if (g_has_vnni && g_isa.load(std::memory_order_relaxed) >= ISA_AVX512) {
    drive(a, plansvnni().pick(M));
    return y;
  }
#endif
  linear_i8_scalar(a);
  return y;
}

at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return linear_impl(F_F16, x, weight, c10::nullopt, bias);
}

std::string get_isa() { return kIsaNames[g_isa.load()]; }
std::string max_isa() { return kIsaNames[g_max_isa]; }

void set_isa(const std::string& name) {
  for (int i = 0; i < 4; ++i) {
    if (name == kIsaNames[i]) {
      TORCH_CHECK(i <= g_max_isa, "glm_qlinear: ISA '", name, "' is not supported by this CPU (max '",
                  kIsaNames[g_max_isa], "')");
      g_isa.store(i);
      return;
    }
  }
  TORCH_CHECK(false, "glm_qlinear: unknown ISA '", name, "' (scalar, avx2, avx512, avx512bf16)");
}

}  // namespace

namespace glm {
int current_isa() { return g_isa.load(std::memory_order_relaxed); }
}  // namespace glm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU kernels for THUDM ChatGLM int4/int8 weight-only quantized linear layers";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("int4_linear", &int4_linear, "y = x @ dequant(qweight int4 [N,K/2], scale [N]).T + bias",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("bias") = py::none(), nogil);
  m.def("int8_linear", &int8_linear, "y = x @ dequant(qweight int8 [N,K], scale [N]).T + bias",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("bias") = py::none(), nogil);
  m.def("int4_linear_i8", &int4_linear_i8,
        "y = quant8(x) @ dequant(qweight int4 [N,K/2], scale [N]).T + bias, x quantized per row",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("bias") = py::none(), nogil);
  m.def("has_vnni", []() { return g_has_vnni; }, "AVX-512 VNNI available (int4_linear_i8 fast path)");
  m.def("half_linear", &half_linear, "y = x @ weight(fp16/bf16 [N,K]).T + bias", py::arg("x"),
        py::arg("weight"), py::arg("bias") = py::none(), nogil);
  m.def("decode_attention", &glm::decode_attention,
        "one decode step of attention for B sequences, each over its own KV cache (attention.cpp)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("k_caches"), py::arg("v_caches"), py::arg("layer"),
        py::arg("slots"), py::arg("scale"), py::arg("cos") = py::none(), py::arg("sin") = py::none(), nogil);
  m.def("prefill_attention", &glm::prefill_attention,
        "causal attention of rows first_slot.. of a prompt chunk over one KV cache, each row as decode_attention "
        "computes it (attention.cpp)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("layer"), py::arg("first_slot"),
        py::arg("scale"), nogil);
  m.def("rms_norm", &glm::rms_norm, "RMSNorm over the last dim, fp32 math (pointwise.cpp)", py::arg("x"),
        py::arg("weight"), py::arg("eps"), nogil);
  m.def("swiglu", &glm::swiglu, "silu(h[..., :F]) * h[..., F:] (pointwise.cpp)", py::arg("h"), nogil);
  m.def("isa", &get_isa, "ISA path currently used");
  m.def("max_isa", &max_isa, "best ISA path supported by this CPU");
  m.def("set_isa", &set_isa, "force an ISA path (scalar, avx2, avx512, avx512bf16) for testing",
        py::arg("name"));
}
