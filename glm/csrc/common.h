// Declarations shared by the extension's sources (qlinear.cpp holds the module definition).
#pragma once

#include <torch/extension.h>

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
#endif

namespace glm {

// ISA path in use: 0 scalar, 1 avx2, 2 avx512, 3 avx512bf16 (qlinear.cpp; set_isa() changes it).
int current_isa();

// attention.cpp: one decode step of attention for a batch of sequences, each over its own cache.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                            int64_t layer, const std::vector<int64_t>& slots, double scale,
                            const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin);

}  // namespace glm
