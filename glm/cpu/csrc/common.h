// What the extension's sources share: per-function ISA targets, fp32 / bf16 vector helpers, the
// instruction-set paths and every entry point the Python module binds (module.cpp).
#pragma once

#include <torch/extension.h>
#include <c10/util/BFloat16.h>

#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define GLM_X86 1
#include <cpuid.h>
#include <immintrin.h>
// Per-function ISA targets: one build runs everywhere, each path only where the CPU has it.
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define AVX512BF16_FN \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#define AVX512VNNI_FN \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

// 16 bf16 values -> fp32 (exact: bf16 is the top half of an fp32).
AVX512_FN inline __m512 widen_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Mask of the first min(n, 16) lanes (a row's tail).
AVX512_FN inline __mmask16 tail16(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

// 16 fp32 / bf16 values as fp32: all of them, or the lanes of mask m (the others 0).
AVX512_FN inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512_FN inline __m512 load16(const c10::BFloat16* p) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
AVX512_FN inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
AVX512_FN inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  return widen_bf16(_mm256_maskz_loadu_epi16(m, p));
}

// 16 fp32 -> bf16, round to nearest even, NaN -> 0x7FC0: the bits of c10::BFloat16(float).
AVX512_FN inline __m256i narrow_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// exp(x), about 1 ulp: x = n ln2 + r, |r| <= ln2 / 2, e^r by the Cephes expf polynomial, times 2^n
// by VSCALEFPS (overflows to inf and underflows to 0 correctly; NaN stays NaN).
AVX512_FN inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

namespace glm {

// One element of an fp32 / bf16 tensor as fp32, and back (bf16: round to nearest even).
inline float load1(const float* p) { return *p; }
inline float load1(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline void store1(float* p, float v) { *p = v; }
inline void store1(c10::BFloat16* p, float v) { *p = c10::BFloat16(v); }

// Instruction-set paths, each including the ones before it. current_isa() is the path in use: the
// best this CPU has, or a lower one chosen by GLM_KERNEL_ISA or set_isa() (module.cpp).
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
Isa current_isa();
// Whether this CPU has AVX-512 VNNI (int4_linear_i8's integer dot products), whatever the path in use.
bool cpu_has_vnni();

// linear.cpp: y = x @ W^T + bias for THUDM's int4 / int8 weights and for fp16 / bf16 weights.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias);
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
// The same as int4_linear with each row of x quantized to int8 first (integer dot products).
at::Tensor int4_linear_i8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias);

// attention.cpp: one decode step of attention for a batch of sequences, each over its own cache.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                            int64_t layer, const std::vector<int64_t>& slots, double scale,
                            const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin);
// attention.cpp: a prompt chunk's causal attention over one cache, each query row as a decode step.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             int64_t layer, int64_t first_slot, double scale);

// pointwise.cpp: RMSNorm over the last dim and SwiGLU (silu(first half) * second half), fp32 math.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor swiglu(const at::Tensor& h);

}  // namespace glm
