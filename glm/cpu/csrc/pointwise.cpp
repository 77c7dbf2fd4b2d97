// Row-wise ops of the ChatGLM2 block that cost more in torch dispatch than in math at decode
// (a handful of small ops each, 57 RMSNorms and 28 SwiGLUs per token):
//
//   rms_norm(x [..., K], weight [K], eps): y = weight * (x * (1 / sqrt(mean(x^2) + eps)))
//   swiglu(h [..., 2F]):                   y = silu(h[..., :F]) * h[..., F:],  silu(g) = g / (1 + e^-g)
//
// x / h float32 or bfloat16 (y in the same dtype), weight float32 or bfloat16; all math in fp32.
// bfloat16 rounds where glm.model's torch code rounds: swiglu rounds silu(g) to bf16 before the
// product, as F.silu(gate) * up does. Each row is computed alone in a fixed order, so a row's result
// does not depend on the other rows or the thread count (BATCH INVARIANCE, see tiles.cpp); the
// sum of squares runs in 16 lanes on AVX-512 and sequentially in the scalar path.

#include "common.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

using glm::load1;
using glm::store1;
inline float round_to(float v, const float*) { return v; }
inline float round_to(float v, const c10::BFloat16*) { return static_cast<float>(c10::BFloat16(v)); }

template <typename T, typename W>
void rms_row_scalar(const T* x, const W* w, T* y, int64_t K, float eps) {
  float ss = 0.f;
  for (int64_t k = 0; k < K; ++k) ss += load1(x + k) * load1(x + k);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(K) + eps);
  for (int64_t k = 0; k < K; ++k) store1(y + k, load1(w + k) * (load1(x + k) * r));
}

template <typename T>
void swiglu_row_scalar(const T* g, const T* u, T* y, int64_t F) {
  for (int64_t f = 0; f < F; ++f) {
    const float a = load1(g + f);
    store1(y + f, round_to(a / (1.f + std::exp(-a)), g) * load1(u + f));
  }
}

#ifdef GLM_X86
AVX512_FN inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
AVX512_FN inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, narrow_bf16(v));
}
AVX512_FN inline __m512 round16(__m512 v, const float*) { return v; }
AVX512_FN inline __m512 round16(__m512 v, const c10::BFloat16*) { return widen_bf16(narrow_bf16(v)); }

template <typename T, typename W>
AVX512_FN void rms_row_avx512(const T* x, const W* w, T* y, int64_t K, float eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 v = load16(x + k, tail16(K - k));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float r = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(K) + eps);
  const __m512 vr = _mm512_set1_ps(r);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = tail16(K - k);
    store16(y + k, _mm512_mul_ps(load16(w + k, m), _mm512_mul_ps(load16(x + k, m), vr)), m);
  }
}

template <typename T>
AVX512_FN void swiglu_row_avx512(const T* g, const T* u, T* y, int64_t F) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t f = 0; f < F; f += 16) {
    const __mmask16 m = tail16(F - f);
    const __m512 a = load16(g + f, m);
    const __m512 s = round16(_mm512_div_ps(a, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), a)))), g);
    store16(y + f, _mm512_mul_ps(s, load16(u + f, m)), m);
  }
}
#endif

bool uses_avx512() {
#ifdef GLM_X86
  return glm::current_isa() >= glm::kAvx512;
#else
  return false;
#endif
}

// Rows per parallel chunk: about 64K elements, so decode (1-8 rows) stays on the calling thread.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, width)); }

template <typename T, typename W>
void rms_norm_rows(const T* x, const W* w, T* y, int64_t rows, int64_t K, float eps) {
  const bool vec = uses_avx512();
  at::parallel_for(0, rows, row_grain(K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
#ifdef GLM_X86
      if (vec) {
        rms_row_avx512(x + r * K, w, y + r * K, K, eps);
        continue;
      }
#endif
      rms_row_scalar(x + r * K, w, y + r * K, K, eps);
    }
  });
}

template <typename T>
void swiglu_rows(const T* h, T* y, int64_t rows, int64_t F) {
  const bool vec = uses_avx512();
  at::parallel_for(0, rows, row_grain(2 * F), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
#ifdef GLM_X86
      if (vec) {
        swiglu_row_avx512(h + r * 2 * F, h + r * 2 * F + F, y + r * F, F);
        continue;
      }
#endif
      swiglu_row_scalar(h + r * 2 * F, h + r * 2 * F + F, y + r * F, F);
    }
  });
}

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  x.dim() >= 1 && x.is_contiguous(),
              op, ": x must be a contiguous float32 or bfloat16 CPU tensor, got ", x.scalar_type(), " ", x.sizes());
}

}  // namespace

namespace glm {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_input(x, "rms_norm");
  const int64_t K = x.size(-1), rows = K ? x.numel() / K : 0;
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 1 && weight.size(0) == K && weight.is_contiguous() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "rms_norm: weight must be a contiguous float32 or bfloat16 [", K, "] CPU tensor, got ",
              weight.scalar_type(), " ", weight.sizes());
  at::Tensor y = at::empty_like(x);
  if (rows == 0 || K == 0) return y;
  const float e = static_cast<float>(eps);
  const bool wf = weight.scalar_type() == at::kFloat;
  if (x.scalar_type() == at::kFloat) {
    auto* xp = x.data_ptr<float>();
    auto* yp = y.data_ptr<float>();
    if (wf) rms_norm_rows(xp, weight.data_ptr<float>(), yp, rows, K, e);
    else rms_norm_rows(xp, weight.data_ptr<c10::BFloat16>(), yp, rows, K, e);
  } else {
    auto* xp = x.data_ptr<c10::BFloat16>();
    auto* yp = y.data_ptr<c10::BFloat16>();
    if (wf) rms_norm_rows(xp, weight.data_ptr<float>(), yp, rows, K, e);
    else rms_norm_rows(xp, weight.data_ptr<c10::BFloat16>(), yp, rows, K, e);
  }
  return y;
}

at::Tensor swiglu(const at::Tensor& h) {
  check_input(h, "swiglu");
  const int64_t W = h.size(-1);
  TORCH_CHECK(W % 2 == 0, "swiglu: the last dim must be even (gate and up halves), got ", W);
  const int64_t F = W / 2, rows = W ? h.numel() / W : 0;
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
  shape.back() = F;
  at::Tensor y = at::empty(shape, h.options());
  if (rows == 0 || F == 0) return y;
  if (h.scalar_type() == at::kFloat)
    swiglu_rows(h.data_ptr<float>(), y.data_ptr<float>(), rows, F);
  else
    swiglu_rows(h.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), rows, F);
  return y;
}

}  // namespace glm
