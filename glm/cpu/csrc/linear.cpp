// Linear layers on THUDM's weight-only quantized formats, read in place (no repacking):
//   int8: qweight int8 [N, K], W[i,k] = qweight[i,k] * scale[i]
//   int4: qweight int8 [N, K/2]; byte b = qweight[i,j]: W[i,2j] = scale[i]*(b >> 4),
//         W[i,2j+1] = scale[i]*((int8)(b << 4) >> 4)   (both signed nibbles)
//   half: weight fp16 / bf16 [N, K] (the un-quantized output layer)
// y[m, n] = sum_k x[m,k] * W[n,k] (+ bias[n]), fp32 accumulation, output in x's dtype.
//
// This file checks a call's tensors, prepares the activations in the layout its path reads and
// hands the call to the tiles (tiles.cpp), or computes it in portable C++ on the scalar path:
//   avx512bf16 : bf16 x with int4 / int8 / bf16 weights by VDPBF16PS (weights decoded to bf16
//                exactly: small integers). For int4, x is de-interleaved into bf16 x_even / x_odd
//                for EVERY M: the interleaved layout pairs different k per VDPBF16PS, so its sums
//                round differently, and one row's result must not depend on M.
//                Everything else as avx512.
//   avx512     : fp32 x; int4 de-interleaves x once per call into x_even / x_odd
//   avx2       : fp32 x, the same layouts
//   scalar     : fp32 x, natural order
//   int4_linear_i8 (opt-in): x quantized per row to int8, integer dot products (VPDPBUSD when the CPU
//                has AVX-512 VNNI and the path is avx512 or above, else the same sums in scalar code).

#include "linear.h"

#include <c10/util/Half.h>

#include <cmath>
#include <vector>

namespace glm {
namespace {

// ----------------------------------------------------------------------------------------------
// Scalar path (portable). Decodes one weight row into fp32 once, then dots it with every x row.
// ----------------------------------------------------------------------------------------------
inline void decode_row_scalar(int fmt, const uint8_t* row, int64_t K, float* out) {
  switch (fmt) {
    case kInt4:
      for (int64_t j = 0; j < K / 2; ++j) {
        const int8_t b = static_cast<int8_t>(row[j]);
        out[2 * j] = static_cast<float>(b >> 4);
        out[2 * j + 1] = static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4);
      }
      break;
    case kInt8:
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(static_cast<int8_t>(row[k]));
      break;
    case kF16: {
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

// Scalar int4 x int8-activation path: the same integer sums as the VNNI tiles, so the same bits.
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
// Argument checks and activation layouts
// ----------------------------------------------------------------------------------------------
bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_x(const char* fn, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), fn, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              fn, ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, fn, ": x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), fn, ": x must be contiguous");
}

const float* prep_vec(const char* fn, const c10::optional<at::Tensor>& t, int64_t N, const char* what,
                      at::Tensor& holder) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device().is_cpu(), fn, ": ", what, " must be a CPU tensor");
  TORCH_CHECK(is_float_dtype(t->scalar_type()), fn, ": ", what,
              " must be float16/bfloat16/float32, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == N, fn, ": ", what, " must have shape [", N,
              "], got ", t->sizes());
  holder = t->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

// What every entry point sets the same way: weights, scale and bias (as fp32, kept alive by the
// holders), shapes, and the output y [M, N] in x's dtype.
at::Tensor init_args(const char* fn, LinArgs& a, const at::Tensor& x, const at::Tensor& w, int64_t row_bytes,
                     const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
                     at::Tensor& scale_f, at::Tensor& bias_f) {
  a.M = x.size(0);
  a.K = x.size(1);
  a.N = w.size(0);
  a.scale = prep_vec(fn, scale, a.N, "scale", scale_f);
  a.bias = prep_vec(fn, bias, a.N, "bias", bias_f);
  a.w = reinterpret_cast<const uint8_t*>(w.data_ptr());
  a.w_row_bytes = row_bytes;
  at::Tensor y = at::empty({a.M, a.N}, x.options());
  a.y = y.data_ptr();
  a.y_bf16 = x.scalar_type() == at::kBFloat16;
  return y;
}

// x [M, K] -> x_even = x[:, 0::2], x_odd = x[:, 1::2], each [M, K/2].
template <class T>
void deinterleave(const T* x, int64_t M, int64_t K, T* even, T* odd) {
  const int64_t Kh = K / 2;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < Kh; ++j) {
      even[m * Kh + j] = x[m * K + 2 * j];
      odd[m * Kh + j] = x[m * K + 2 * j + 1];
    }
}

at::Tensor linear_impl(const char* fn, int fmt, const at::Tensor& x, const at::Tensor& w,
                       const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias) {
  check_x(fn, x);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(w.device().is_cpu(), fn, ": weight must be a CPU tensor");
  TORCH_CHECK(w.dim() == 2, fn, ": weight must be 2-D, got shape ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), fn, ": weight must be contiguous (row-major [N, K'])");
  const int64_t N = w.size(0);
  int64_t row_bytes = 0;
  if (fmt == kInt4 || fmt == kInt8) {
    TORCH_CHECK(w.scalar_type() == at::kChar, fn, ": qweight must be int8, got ", w.scalar_type());
    const int64_t expect = fmt == kInt4 ? K / 2 : K;
    TORCH_CHECK(fmt != kInt4 || K % 2 == 0, fn, ": int4 needs an even K, got K=", K);
    TORCH_CHECK(w.size(1) == expect, fn, ": qweight must be [N, ", expect, "] for x with K=", K, ", got ",
                w.sizes());
    row_bytes = expect;
    TORCH_CHECK(scale.has_value() && scale->defined(), fn, ": scale is required");
  } else {
    TORCH_CHECK(w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16,
                fn, ": weight must be float16 or bfloat16, got ", w.scalar_type());
    TORCH_CHECK(w.size(1) == K, fn, ": weight must be [N, ", K, "], got ", w.sizes());
    row_bytes = 2 * K;
    fmt = w.scalar_type() == at::kHalf ? kF16 : kBf16;
  }
  at::Tensor scale_f, bias_f;
  LinArgs a;
  at::Tensor y = init_args(fn, a, x, w, row_bytes, scale, bias, scale_f, bias_f);
  if (M == 0 || N == 0) return y;

  const Isa isa = current_isa();
  const bool xbf = x.scalar_type() == at::kBFloat16;
  at::Tensor xf, xeo;
#ifdef GLM_X86
  if (isa >= kAvx512Bf16 && xbf && fmt == kInt4) {
    const int64_t Kh = K / 2;
    xeo = at::empty({2, M, Kh}, x.options());
    uint16_t* xe = reinterpret_cast<uint16_t*>(xeo.data_ptr());
    deinterleave(reinterpret_cast<const uint16_t*>(x.data_ptr()), M, K, xe, xe + M * Kh);
    a.xb = xe;
    a.xb1 = xe + M * Kh;
    a.ldx = a.lanes = Kh;
    run_tiles(Tiles::kBf16Int4, kInt4, a);
    return y;
  }
  if (isa >= kAvx512Bf16 && xbf && fmt != kF16) {
    a.xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
    a.ldx = a.lanes = K;
    run_tiles(Tiles::kBf16, static_cast<Fmt>(fmt), a);
    return y;
  }
#endif
  xf = xbf ? x.to(at::kFloat) : x;
  a.xf = xf.data_ptr<float>();
  if (isa == kScalar) {
    linear_scalar(fmt, a);
    return y;
  }
#ifdef GLM_X86
  if (fmt == kInt4) {
    const int64_t Kh = K / 2;
    xeo = at::empty({2, M, Kh}, xf.options());
    float* xe = xeo.data_ptr<float>();
    deinterleave(a.xf, M, K, xe, xe + M * Kh);
    a.x0 = xe;
    a.x1 = xe + M * Kh;
    a.ldx = a.lanes = Kh;
  } else {
    a.x0 = a.xf;
    a.ldx = a.lanes = K;
  }
  run_tiles(isa >= kAvx512 ? Tiles::kFp32Avx512 : Tiles::kFp32Avx2, static_cast<Fmt>(fmt), a);
#endif
  return y;
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
  if (current_isa() >= kAvx512) {
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

}  // namespace

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  return linear_impl("int4_linear", kInt4, x, qweight, scale, bias);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  return linear_impl("int8_linear", kInt8, x, qweight, scale, bias);
}

at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return linear_impl("half_linear", kF16, x, weight, c10::nullopt, bias);
}

// y = dequant(x_q) @ dequant(qweight).T + bias with x quantized per row to int8 (symmetric,
// scale = max|x| / 127, round half to even), integer dot products, one float rescale per output.
at::Tensor int4_linear_i8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias) {
  const char* fn = "int4_linear_i8";
  check_x(fn, x);
  TORCH_CHECK(x.scalar_type() == at::kFloat, fn, ": needs float32 x, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 2 == 0 && K <= 16384, fn, ": needs an even K <= 16384, got K=", K);
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous() &&
                  w.size(1) == K / 2,
              fn, ": qweight must be a contiguous int8 CPU tensor [N, ", K / 2, "], got ", w.sizes());
  const int64_t N = w.size(0), Kh = K / 2;
  at::Tensor scale_f, bias_f;
  LinArgs a;
  at::Tensor y = init_args(fn, a, x, w, Kh, scale, bias, scale_f, bias_f);
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
  a.ldx = a.lanes = Kh;
#ifdef GLM_X86
  if (cpu_has_vnni() && current_isa() >= kAvx512) {
    run_tiles(Tiles::kInt8Vnni, kInt4, a);
    return y;
  }
#endif
  linear_i8_scalar(a);
  return y;
}

}  // namespace glm
