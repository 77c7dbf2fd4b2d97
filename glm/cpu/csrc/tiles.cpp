// The vector kernels of the linear layers: one tile frame, and per instruction set the k-step it
// repeats. A tile computes the dot products of R weight rows with MT activation rows; the weight
// rows are decoded once per k-step and used by all MT activation rows.
//
// BATCH INVARIANCE (product requirement): output row m depends only on x[m] and the weights,
// bitwise, whatever M, the row's position, its neighbours and the thread count (the engine
// batches the decode step of concurrent requests; tests/kernels/test_kernels.py::test_batch_invariant).
// tile() below owns that rule, so every step type inherits it: ONE accumulator per (weight row,
// activation row), the same full k-steps from k = 0 upward and one masked tail step, the same
// reduction and store. The tile shape (R x MT, full or a row / token tail) only chooses how many
// such independent dot products run side by side. A step must do the same arithmetic for every
// (row, token) of its tile; never add per-M variants of it (split accumulators, a different x
// layout for some M, ...). The build uses -ffp-contract=off (glm/cpu/kernels.py) so the compiler
// cannot fuse plain C++ mul + add differently in different instantiations; FMAs are intrinsics.
//
// The frame carries no target attribute: each step type stamps it out in a `run` entry compiled
// for its instruction set (flatten inlines frame and step there), so one build never executes an
// instruction the CPU lacks.

#include "linear.h"

#include <c10/util/Half.h>

#include <utility>

#ifdef GLM_X86
namespace glm {
namespace {

// Software prefetch of the NEXT tile's weight rows while this tile streams its own: the tile
// consumes R * row_bytes contiguous bytes, but as R short interleaved streams that the hardware
// prefetcher keeps losing at tile boundaries. Prefetching the next tile linearly (the same number
// of bytes per k-step as consumed) keeps the DRAM pipe full. Prefetches never fault. Into L2 (T1),
// not L1 (T0): the rows are read once, by this thread, one tile later.
template <int BYTES>
inline void prefetch_span(const uint8_t* p) {
  for (int o = 0; o < BYTES; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T1);
}

// The tile's next neighbour (rows n0 + R ...) is prefetched while the tile runs. With M > MT the
// tile runs in np = ceil(M / MT) passes over the same weight rows, and each pass prefetches its
// 1/np share of the next tile (one span every np-th k-step), so DRAM streams during every pass
// instead of idling in all but the first.
struct NextTilePrefetch {
  const uint8_t* p;
  int64_t np, phase = 0;
  NextTilePrefetch(const LinArgs& a, int64_t n0, int64_t m0, int R, int MT) : np((a.M + MT - 1) / MT) {
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

// THE TILE FRAME: rows n0 .. n0+R-1 of the weights x rows m0 .. m0+MT-1 of the activations.
// Step supplies: Acc (one (row, token) accumulator), kLanes (k-lanes of a full step) and
// kRowBytes (weight bytes of one row a full step reads), a constructor from (args, m0) that
// points at the tile's activations, body<R, MT, TAIL>(w, l, n, acc) (lanes l .. l+n-1; n <
// kLanes only in the one TAIL step) and store(args, m, n, acc).
template <class Step, int R, int MT>
inline void tile(const LinArgs& a, int64_t n0, int64_t m0) {
  typename Step::Acc acc[R][MT] = {};  // ONE accumulator per (row, token), zero
  const uint8_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = a.w + (n0 + r) * a.w_row_bytes;
  const Step step(a, m0);
  NextTilePrefetch next(a, n0, m0, R, MT);
  constexpr int kSpan = R * Step::kRowBytes;
  int64_t l = 0;
  for (; l + Step::kLanes <= a.lanes; l += Step::kLanes) {
    if (const uint8_t* pf = next.step(kSpan)) prefetch_span<kSpan>(pf);
    step.template body<R, MT, false>(w, l, Step::kLanes, acc);
  }
  if (l < a.lanes) step.template body<R, MT, true>(w, l, a.lanes - l, acc);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) Step::store(a, m0 + m, n0 + r, acc[r][m]);
}

// A step type's entry point for R x MT tiles: the frame compiled for the step's instruction set
// (function attributes cannot be template arguments, hence a macro), everything inlined into it.
#define GLM_TILE_ENTRY(TARGET_FN, Step)                                                       \
  template <int R, int MT>                                                                     \
  TARGET_FN __attribute__((noinline, flatten)) static void run(const LinArgs& a, int64_t n0, int64_t m0) { \
    tile<Step, R, MT>(a, n0, m0);                                                              \
  }

// Weight bytes per k-lane of the fp32 paths (int4 counts a lane per byte: two de-interleaved k).
template <int FMT>
constexpr int kBytesPerLane = (FMT == kF16 || FMT == kBf16) ? 2 : 1;

// ----------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C: fp32 x, 8 lanes; the last K % 8 lanes one at a time into a scalar sum.
// ----------------------------------------------------------------------------------------------
template <int FMT>
AVX2_FN inline void dec256(const uint8_t* row, int64_t l, __m256* w) {
  if constexpr (FMT == kInt4) {
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + l)));
    w[0] = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 4));
    w[1] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28));
  } else if constexpr (FMT == kInt8) {
    w[0] = _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + l))));
  } else if constexpr (FMT == kF16) {
    w[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * l)));
  } else {
    w[0] = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * l))), 16));
  }
}

template <int FMT>
inline void dec_lane_scalar(const uint8_t* row, int64_t l, float* w) {
  if constexpr (FMT == kInt4) {
    const int8_t b = static_cast<int8_t>(row[l]);
    w[0] = static_cast<float>(b >> 4);
    w[1] = static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4);
  } else if constexpr (FMT == kInt8) {
    w[0] = static_cast<float>(static_cast<int8_t>(row[l]));
  } else if constexpr (FMT == kF16) {
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

struct Avx2Acc {
  __m256 v;    // the 8-lane sums
  float tail;  // the last K % 8 lanes
};

// The fp32 activations of a tile: x (int8 / half weights) or x_even and x_odd (int4), from row m0.
template <int FMT>
struct Fp32Rows {
  static constexpr int NV = FMT == kInt4 ? 2 : 1;  // x vectors per lane block
  const float* xs[2];
  int64_t ldx;
  Fp32Rows(const LinArgs& a, int64_t m0) : xs{a.x0 + m0 * a.ldx, (NV == 2 ? a.x1 : a.x0) + m0 * a.ldx}, ldx(a.ldx) {}
  // Row m of vector v (0: x or x_even, 1: x_odd).
  const float* at(int v, int m) const { return xs[v] + m * ldx; }
};

template <int FMT>
struct Fp32Avx2 {
  using Acc = Avx2Acc;
  static constexpr int kLanes = 8;
  static constexpr int kRowBytes = kLanes * kBytesPerLane<FMT>;
  static constexpr int NV = Fp32Rows<FMT>::NV;
  const Fp32Rows<FMT> x;

  Fp32Avx2(const LinArgs& a, int64_t m0) : x(a, m0) {}

  template <int R, int MT, bool TAIL>
  AVX2_FN void body(const uint8_t* const* wr, int64_t l, int64_t n, Acc (&acc)[R][MT]) const {
    if constexpr (!TAIL) {
      __m256 w[R][NV];
      for (int r = 0; r < R; ++r) dec256<FMT>(wr[r], l, w[r]);
      for (int m = 0; m < MT; ++m)
        for (int v = 0; v < NV; ++v) {
          const __m256 xv = _mm256_loadu_ps(x.at(v, m) + l);
          for (int r = 0; r < R; ++r) acc[r][m].v = _mm256_fmadd_ps(w[r][v], xv, acc[r][m].v);
        }
    } else {
      for (int64_t i = l; i < l + n; ++i)
        for (int r = 0; r < R; ++r) {
          float w[2];
          dec_lane_scalar<FMT>(wr[r], i, w);
          for (int m = 0; m < MT; ++m)
            for (int v = 0; v < NV; ++v) acc[r][m].tail += w[v] * x.at(v, m)[i];
        }
    }
  }

  AVX2_FN static void store(const LinArgs& a, int64_t m, int64_t n, const Acc& acc) {
    store_out(a, m, n, hsum256(acc.v) + acc.tail);
  }

  GLM_TILE_ENTRY(AVX2_FN, Fp32Avx2)
};

// ----------------------------------------------------------------------------------------------
// AVX-512: fp32 x, 16 lanes, masked tail. int4 nibbles -> float by VPERMPS on a 16-entry table.
// ----------------------------------------------------------------------------------------------
template <int FMT, bool TAIL>
AVX512_FN inline void dec512(const uint8_t* row, int64_t l, __mmask16 mk, __m512* w) {
  if constexpr (FMT == kInt4) {
    const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    const __m128i b = TAIL ? _mm_maskz_loadu_epi8(mk, row + l)
                           : _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + l));
    const __m512i v = _mm512_cvtepu8_epi32(b);
    w[0] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);  // high nibble -> even column
    w[1] = _mm512_permutexvar_ps(v, lut);                        // low nibble  -> odd column
  } else if constexpr (FMT == kInt8) {
    const __m128i b = TAIL ? _mm_maskz_loadu_epi8(mk, row + l)
                           : _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + l));
    w[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  } else if constexpr (FMT == kF16) {
    const __m256i h = TAIL ? _mm256_maskz_loadu_epi16(mk, row + 2 * l)
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * l));
    w[0] = _mm512_cvtph_ps(h);
  } else {
    const __m256i h = TAIL ? _mm256_maskz_loadu_epi16(mk, row + 2 * l)
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * l));
    w[0] = widen_bf16(h);
  }
}

// The store of the AVX-512 fp32 accumulators: one fixed-order horizontal sum per (row, token).
struct Fp32Acc512 {
  using Acc = __m512;
  AVX512_FN static void store(const LinArgs& a, int64_t m, int64_t n, const Acc& acc) {
    store_out(a, m, n, _mm512_reduce_add_ps(acc));
  }
};

template <int FMT>
struct Fp32Avx512 : Fp32Acc512 {
  static constexpr int kLanes = 16;
  static constexpr int kRowBytes = kLanes * kBytesPerLane<FMT>;
  static constexpr int NV = Fp32Rows<FMT>::NV;
  const Fp32Rows<FMT> x;

  Fp32Avx512(const LinArgs& a, int64_t m0) : x(a, m0) {}

  template <int R, int MT, bool TAIL>
  AVX512_FN void body(const uint8_t* const* wr, int64_t l, int64_t n, Acc (&acc)[R][MT]) const {
    const __mmask16 mk = TAIL ? tail16(n) : static_cast<__mmask16>(0xFFFF);
    __m512 w[R][NV];
    for (int r = 0; r < R; ++r) dec512<FMT, TAIL>(wr[r], l, mk, w[r]);
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < NV; ++v) {
        const __m512 xv = TAIL ? _mm512_maskz_loadu_ps(mk, x.at(v, m) + l) : _mm512_loadu_ps(x.at(v, m) + l);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(w[r][v], xv, acc[r][m]);
      }
  }

  GLM_TILE_ENTRY(AVX512_FN, Fp32Avx512)
};

// ----------------------------------------------------------------------------------------------
// AVX-512 BF16: bf16 x, VDPBF16PS on (w[2i], w[2i+1]) x (x[2i], x[2i+1]) pairs, 32 k per step.
// Weights are decoded to bf16 exactly (integers |q| <= 128); products exact, fp32 accumulation.
// ----------------------------------------------------------------------------------------------
template <int FMT, bool TAIL>
AVX512BF16_FN inline __m512i decbf(const uint8_t* row, int64_t e, int64_t n) {
  const __mmask32 mk = TAIL ? static_cast<__mmask32>((1ull << n) - 1ull) : 0xFFFFFFFFu;
  if constexpr (FMT == kInt8) {
    const __m256i b = TAIL ? _mm256_maskz_loadu_epi8(mk, row + e)
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + e));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  } else {
    static_assert(FMT == kBf16, "bf16 x: int8 or bf16 weights (int4 has Bf16Int4, fp16 the fp32 path)");
    return TAIL ? _mm512_maskz_loadu_epi16(mk, row + 2 * e)
                : _mm512_loadu_si512(reinterpret_cast<const void*>(row + 2 * e));
  }
}

template <int FMT>
struct Bf16 : Fp32Acc512 {
  static constexpr int kLanes = 32;
  static constexpr int kRowBytes = FMT == kInt8 ? 32 : 64;
  const uint16_t* xb;
  int64_t ldx;

  Bf16(const LinArgs& a, int64_t m0) : xb(a.xb + m0 * a.ldx), ldx(a.ldx) {}

  template <int R, int MT, bool TAIL>
  AVX512BF16_FN void body(const uint8_t* const* wr, int64_t e, int64_t n, Acc (&acc)[R][MT]) const {
    __m512i w[R];
    for (int r = 0; r < R; ++r) w[r] = decbf<FMT, TAIL>(wr[r], e, n);
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = TAIL ? _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << n) - 1ull), xb + m * ldx + e)
                              : _mm512_loadu_si512(reinterpret_cast<const void*>(xb + m * ldx + e));
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w[r], (__m512bh)xv);
    }
  }

  GLM_TILE_ENTRY(AVX512BF16_FN, Bf16)
};

// int4 x bf16 activations, de-interleaved: 32 weight bytes -> VPMOVZXBW gives one byte per word;
// VPERMW on the low 5 bits (the table repeats every 16) yields the 32 low nibbles (odd columns) as
// bf16, and after VPSRLW 4 the 32 high nibbles (even columns). VDPBF16PS then pairs them with
// 32 consecutive bf16 x_odd / x_even values: 4 decode ops + 2 dot ops per 64 weights.
alignas(64) const uint16_t kNibbleBf16[32] = {
    // bf16 bit patterns of the signed nibble values 0..7, -8..-1, twice (VPERMW uses 5 index bits)
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80};

struct Bf16Int4 : Fp32Acc512 {
  static constexpr int kLanes = 32;  // weight bytes = k pairs
  static constexpr int kRowBytes = 32;
  const uint16_t* xe;
  const uint16_t* xo;
  int64_t ldx;
  __m512i lut;

  AVX512BF16_FN Bf16Int4(const LinArgs& a, int64_t m0)
      : xe(a.xb + m0 * a.ldx), xo(a.xb1 + m0 * a.ldx), ldx(a.ldx),
        lut(_mm512_load_si512(reinterpret_cast<const void*>(kNibbleBf16))) {}

  template <int R, int MT, bool TAIL>
  AVX512BF16_FN void body(const uint8_t* const* wr, int64_t j, int64_t n, Acc (&acc)[R][MT]) const {
    const __mmask32 mk = TAIL ? static_cast<__mmask32>((1ull << n) - 1ull) : 0xFFFFFFFFu;
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

  GLM_TILE_ENTRY(AVX512BF16_FN, Bf16Int4)
};

// ----------------------------------------------------------------------------------------------
// AVX-512 VNNI: int4 weights x int8 activations (quantized per row by int4_linear_i8).
// VPDPBUSD multiplies unsigned by signed bytes, so nibbles are biased to u = q + 8 in [0, 15]
// (one VPTERNLOG: (byte & 0x0F) ^ 0x08) and the bias is removed at the end: sum(q x) =
// sum(u x) - 8 sum(x). Integer sums are exact, so any tiling gives the same bits.
// ----------------------------------------------------------------------------------------------
struct Int8Vnni {
  using Acc = __m512i;
  static constexpr int kLanes = 64;  // weight bytes = k pairs
  static constexpr int kRowBytes = 64;
  const int8_t* xe;
  const int8_t* xo;
  int64_t ldx;

  Int8Vnni(const LinArgs& a, int64_t m0) : xe(a.xq0 + m0 * a.ldx), xo(a.xq1 + m0 * a.ldx), ldx(a.ldx) {}

  template <int R, int MT, bool TAIL>
  AVX512VNNI_FN void body(const uint8_t* const* wr, int64_t j, int64_t n, Acc (&acc)[R][MT]) const {
    const __mmask64 mk = TAIL ? (1ull << n) - 1ull : ~0ull;
    const __m512i low4 = _mm512_set1_epi8(0x0F), bias8 = _mm512_set1_epi8(0x08);
    __m512i hi[R], lo[R];
    for (int r = 0; r < R; ++r) {
      const __m512i b = TAIL ? _mm512_maskz_loadu_epi8(mk, wr[r] + j)
                             : _mm512_loadu_si512(reinterpret_cast<const void*>(wr[r] + j));
      lo[r] = _mm512_ternarylogic_epi32(b, low4, bias8, 0x6A);                        // odd columns
      hi[r] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(b, 4), low4, bias8, 0x6A);  // even columns
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

  AVX512VNNI_FN static void store(const LinArgs& a, int64_t m, int64_t n, const Acc& acc) {
    store_i8(a, m, n, _mm512_reduce_add_epi32(acc));
  }

  GLM_TILE_ENTRY(AVX512VNNI_FN, Int8Vnni)
};

// ----------------------------------------------------------------------------------------------
// Plans: which tile instantiations cover an [N, M] call, and the loop over them.
// ----------------------------------------------------------------------------------------------
using TileFn = void (*)(const LinArgs&, int64_t n0, int64_t m0);

constexpr int kMaxMT = 8;

struct Plan {
  int R = 1;   // weight rows per tile
  int MT = 1;  // activation rows per tile
  TileFn full[kMaxMT + 1] = {};    // full[mt]: R rows x mt activation rows (mt < MT: the token tail)
  TileFn single[kMaxMT + 1] = {};  // single[mt]: 1 row x mt activation rows (the row tail)
};

template <class Step, int R, int... Ms>
void fill(TileFn* tab, std::integer_sequence<int, Ms...>) {
  ((tab[Ms + 1] = &Step::template run<R, Ms + 1>), ...);
}

// The plan of Step with R x MT tiles, built once.
template <class Step, int R, int MT>
const Plan& plan() {
  static_assert(MT <= kMaxMT, "MT too large");
  static const Plan p = [] {
    Plan q;
    q.R = R;
    q.MT = MT;
    fill<Step, R>(q.full, std::make_integer_sequence<int, MT>{});
    fill<Step, 1>(q.single, std::make_integer_sequence<int, MT>{});
    return q;
  }();
  return p;
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

template <template <int> class Step, int R, int MT>
const Plan& plan_for(Fmt fmt) {
  switch (fmt) {
    case kInt4: return plan<Step<kInt4>, R, MT>();
    case kInt8: return plan<Step<kInt8>, R, MT>();
    case kF16: return plan<Step<kF16>, R, MT>();
    default: return plan<Step<kBf16>, R, MT>();
  }
}

}  // namespace

// Tile shapes: they change speed only, never a row's arithmetic (see BATCH INVARIANCE). AVX2 has
// 16 vector registers: 2 rows x 4 tokens. AVX-512 has 32: 4 x 4, except bf16 x with int8 / bf16
// weights (one register per decoded row) at M > 4, where the activation block no longer fits L1
// and 3 rows x 8 tokens share each x load among more weight rows.
void run_tiles(Tiles kind, Fmt fmt, const LinArgs& a) {
  switch (kind) {
    case Tiles::kFp32Avx2: return drive(a, plan_for<Fp32Avx2, 2, 4>(fmt));
    case Tiles::kFp32Avx512: return drive(a, plan_for<Fp32Avx512, 4, 4>(fmt));
    case Tiles::kBf16:
      if (fmt == kInt8) return drive(a, a.M <= 4 ? plan<Bf16<kInt8>, 4, 4>() : plan<Bf16<kInt8>, 3, 8>());
      return drive(a, a.M <= 4 ? plan<Bf16<kBf16>, 4, 4>() : plan<Bf16<kBf16>, 3, 8>());
    case Tiles::kBf16Int4: return drive(a, plan<Bf16Int4, 4, 4>());
    case Tiles::kInt8Vnni: return drive(a, plan<Int8Vnni, 4, 4>());
  }
}

}  // namespace glm
#endif  // GLM_X86
