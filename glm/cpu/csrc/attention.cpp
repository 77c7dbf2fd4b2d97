// Decode attention for the engine's batched step: every sequence has one new token, which is
// written into that sequence's KV cache and attends over the cache's first slot + 1 entries.
// One call per layer for the whole batch replaces ~15 small torch ops per sequence (cache slice
// and copy, two matmuls, scale, softmax, casts), which cost more than the math at decode.
// prefill_attention runs a prompt chunk's query rows through the same per-row task, so a
// position's attention output has the same bits whether it was computed in a decode step or in
// any prefill chunk (ROW INVARIANCE: what lets the engine reuse cached KV exactly).
//
//   q [B, heads, hd], k / v [B, groups, hd]: the new token, dtype = cache dtype; each sequence's
//     rows contiguous (the batch stride is free, so q, k, v can be views into the qkv output)
//   cos / sin (optional) fp32 [B, P]: rotary embedding applied here to q and k first: pairs
//     (x[2i], x[2i+1]), i < P, become (x0 c - x1 s, x1 c + x0 s) in fp32, rounded to the dtype,
//     the same operations as glm.model.apply_rotary (so the same bits); dims >= 2P are unchanged
//   k_caches[b] / v_caches[b] [layers, groups, capacity, hd], fp32 or bf16, contiguous
//   slots[b]: cache slot of the new token (P-tuning prefix included)
//   out [B, heads, hd]: softmax(q . k_j * scale) . v, query head h reading kv group h / (heads / groups)
//
// fp32 math throughout: scores, softmax (exp by a Cephes polynomial on AVX-512, std::exp in
// the scalar path) and the weighted sum of values, normalized by a division at the end. Each
// (sequence, group) is an independent task computed in a fixed order, so a sequence's result does
// not depend on the rest of the batch or the thread count (BATCH INVARIANCE, see tiles.cpp).

#include "common.h"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Per-thread scratch, reused across calls: scores / softmax numerators [heads of the group, S], the
// group's query rows in fp32, their softmax sums, the rotated query rows.
struct Scratch {
  std::vector<float> e, qf, sums;
  std::vector<char> qrot;
};

struct Task {
  const void* q;  // [hpg, hd] of this group's query heads
  const void* k;  // cache rows [S, hd] of this group
  const void* v;
  void* out;      // [hpg, hd]
  int64_t S, hd, hpg;
  float scale;
};

using glm::load1;
using glm::store1;

template <typename T>
void attend_scalar(const Task& t, Scratch& sc) {
  std::vector<float>& e = sc.e;
  const T* q = static_cast<const T*>(t.q);
  const T* k = static_cast<const T*>(t.k);
  const T* v = static_cast<const T*>(t.v);
  T* out = static_cast<T*>(t.out);
  e.resize(t.S);
  std::vector<float>& acc = sc.qf;
  acc.resize(t.hd);
  for (int64_t h = 0; h < t.hpg; ++h) {
    const T* qh = q + h * t.hd;
    float mx = -INFINITY;
    for (int64_t j = 0; j < t.S; ++j) {
      float s = 0.f;
      for (int64_t d = 0; d < t.hd; ++d) s += load1(qh + d) * load1(k + j * t.hd + d);
      e[j] = s * t.scale;
      mx = std::max(mx, e[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < t.S; ++j) {
      e[j] = std::exp(e[j] - mx);
      sum += e[j];
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j = 0; j < t.S; ++j)
      for (int64_t d = 0; d < t.hd; ++d) acc[d] += e[j] * load1(v + j * t.hd + d);
    for (int64_t d = 0; d < t.hd; ++d) store1(out + h * t.hd + d, acc[d] / sum);
  }
}

#ifdef GLM_X86

// Softmax numerators of one head's scores in place; returns their sum.
AVX512_FN float exp_scores(float* e, int64_t S) {
  __m512 vmx = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= S; j += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(e + j));
  if (j < S) vmx = _mm512_max_ps(vmx, _mm512_mask_loadu_ps(vmx, tail16(S - j), e + j));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmx));
  __m512 vsum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= S; j += 16) {
    const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(e + j), mx));
    _mm512_storeu_ps(e + j, p);
    vsum = _mm512_add_ps(vsum, p);
  }
  if (j < S) {
    const __mmask16 mk = tail16(S - j);
    const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, e + j), mx));
    _mm512_mask_storeu_ps(e + j, mk, p);
    vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(mk, p));
  }
  return _mm512_reduce_add_ps(vsum);
}

// NC = hd / 16 vectors per head row.
template <typename T, int NC>
AVX512_FN void attend_avx512(const Task& t, Scratch& sc) {
  std::vector<float>& e = sc.e;
  const T* q = static_cast<const T*>(t.q);
  const T* k = static_cast<const T*>(t.k);
  const T* v = static_cast<const T*>(t.v);
  T* out = static_cast<T*>(t.out);
  const int64_t S = t.S, H = t.hpg;
  constexpr int64_t hd = 16 * NC;
  e.resize(H * S);
  std::vector<float>& qf = sc.qf;
  qf.resize(H * hd);
  for (int64_t i = 0; i < H * hd; ++i) qf[i] = load1(q + i);
  for (int64_t j = 0; j < S; ++j) {  // scores: each key row is read (and widened) once
    __m512 kr[NC];
    for (int c = 0; c < NC; ++c) kr[c] = load16(k + j * hd + 16 * c);
    for (int64_t h = 0; h < H; ++h) {
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(&qf[h * hd]), kr[0]);
      for (int c = 1; c < NC; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(&qf[h * hd + 16 * c]), kr[c], acc);
      e[h * S + j] = _mm512_reduce_add_ps(acc) * t.scale;
    }
  }
  std::vector<float>& sums = sc.sums;
  sums.resize(H);
  for (int64_t h = 0; h < H; ++h) sums[h] = exp_scores(&e[h * S], S);
  for (int64_t h0 = 0; h0 < H; h0 += 2) {  // values: two heads share each value row
    const int64_t nh = std::min<int64_t>(2, H - h0);
    __m512 acc[2][NC];
    for (int i = 0; i < 2; ++i)
      for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; ++j) {
      __m512 vr[NC];
      for (int c = 0; c < NC; ++c) vr[c] = load16(v + j * hd + 16 * c);
      for (int64_t i = 0; i < nh; ++i) {
        const __m512 p = _mm512_set1_ps(e[(h0 + i) * S + j]);
        for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_fmadd_ps(p, vr[c], acc[i][c]);
      }
    }
    for (int64_t i = 0; i < nh; ++i) {
      const __m512 sum = _mm512_set1_ps(sums[h0 + i]);
      alignas(64) float row[hd];
      for (int c = 0; c < NC; ++c) _mm512_store_ps(row + 16 * c, _mm512_div_ps(acc[i][c], sum));
      for (int64_t d = 0; d < hd; ++d) store1(out + (h0 + i) * hd + d, row[d]);
    }
  }
}
#endif

// Rotary embedding of `rows` head rows of hd values (see the header comment).
template <typename T>
void rotate(const T* src, T* dst, int64_t rows, int64_t hd, const float* cos, const float* sin, int64_t P) {
  for (int64_t r = 0; r < rows; ++r, src += hd, dst += hd) {
    for (int64_t i = 0; i < P; ++i) {
      const float x0 = load1(src + 2 * i), x1 = load1(src + 2 * i + 1);
      const float a = x0 * cos[i], b = x1 * sin[i], c = x1 * cos[i], d = x0 * sin[i];
      store1(dst + 2 * i, a - b);
      store1(dst + 2 * i + 1, c + d);
    }
    std::memcpy(dst + 2 * P, src + 2 * P, (hd - 2 * P) * sizeof(T));
  }
}

template <typename T>
void attend(const Task& t, Scratch& sc) {
#ifdef GLM_X86
  if (glm::current_isa() >= glm::kAvx512) {
    switch (t.hd) {
      case 16: return attend_avx512<T, 1>(t, sc);
      case 32: return attend_avx512<T, 2>(t, sc);
      case 64: return attend_avx512<T, 4>(t, sc);
      case 128: return attend_avx512<T, 8>(t, sc);
      default: break;
    }
  }
#endif
  attend_scalar<T>(t, sc);
}

}  // namespace

namespace glm {

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                            int64_t layer, const std::vector<int64_t>& slots, double scale,
                            const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "decode_attention: float32 or bfloat16 only, got ", dt);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "decode_attention: q [B, heads, hd], k/v [B, groups, hd]");
  const int64_t B = q.size(0), heads = q.size(1), hd = q.size(2), G = k.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(2) == hd && G > 0 && heads % G == 0, "decode_attention: q ", q.sizes(),
              " and k ", k.sizes(), " do not match");
  TORCH_CHECK(int64_t(k_caches.size()) == B && int64_t(v_caches.size()) == B && int64_t(slots.size()) == B,
              "decode_attention: one k cache, v cache and slot per sequence");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dt && t->stride(2) == 1 && t->stride(1) == hd,
                "decode_attention: q, k, v must be CPU tensors of one dtype with each sequence's rows contiguous");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "decode_attention: give both cos and sin or neither");
  int64_t P = 0;
  if (cos) {
    P = cos->size(-1);
    for (const auto* t : {&*cos, &*sin})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                      t->size(0) == B && t->size(1) == P && 2 * P <= hd,
                  "decode_attention: cos and sin must be contiguous float32 [B, P] with 2 P <= head dim ", hd);
  }
  for (int64_t b = 0; b < B; ++b) {
    for (const auto* c : {&k_caches[b], &v_caches[b]}) {
      TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == dt && c->is_contiguous() && c->dim() == 4 &&
                      c->size(1) == G && c->size(3) == hd && layer >= 0 && layer < c->size(0),
                  "decode_attention: cache ", b, " must be a contiguous [layers, ", G, ", capacity, ", hd,
                  "] tensor of q's dtype with layer ", layer);
    }
    TORCH_CHECK(k_caches[b].sizes() == v_caches[b].sizes(), "decode_attention: k and v caches differ in shape");
    TORCH_CHECK(slots[b] >= 0 && slots[b] < k_caches[b].size(2), "decode_attention: slot ", slots[b],
                " outside cache capacity ", k_caches[b].size(2));
  }
  at::Tensor out = at::empty({B, heads, hd}, q.options());
  const int64_t hpg = heads / G, qs = q.stride(0), ks = k.stride(0), vs = v.stride(0);
  const float* cp = cos ? cos->data_ptr<float>() : nullptr;
  const float* sp = sin ? sin->data_ptr<float>() : nullptr;
  auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    const T* qp = static_cast<const T*>(q.data_ptr());
    const T* kp = static_cast<const T*>(k.data_ptr());
    const T* vp = static_cast<const T*>(v.data_ptr());
    T* op = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, B * G, 1, [&](int64_t t0, int64_t t1) {
      thread_local Scratch sc;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / G, g = t % G, C = k_caches[b].size(2);
        const int64_t row = ((layer * G + g) * C + slots[b]) * hd;  // the new token's cache row
        T* kc = static_cast<T*>(k_caches[b].data_ptr());
        T* vc = static_cast<T*>(v_caches[b].data_ptr());
        const T* qg = qp + b * qs + g * hpg * hd;
        const T* kg = kp + b * ks + g * hd;
        if (cp) {  // rotate k straight into its cache row, q into a scratch copy
          sc.qrot.resize(hpg * hd * sizeof(T));
          T* qr = reinterpret_cast<T*>(sc.qrot.data());
          rotate(kg, kc + row, 1, hd, cp + b * P, sp + b * P, P);
          rotate(qg, qr, hpg, hd, cp + b * P, sp + b * P, P);
          qg = qr;
        } else {
          std::memcpy(kc + row, kg, hd * sizeof(T));
        }
        std::memcpy(vc + row, vp + b * vs + g * hd, hd * sizeof(T));
        const int64_t base = (layer * G + g) * C * hd;
        Task task{qg, kc + base, vc + base, op + (b * heads + g * hpg) * hd, slots[b] + 1, hd, hpg,
                  static_cast<float>(scale)};
        attend<T>(task, sc);
      }
    });
  };
  if (dt == at::kFloat)
    run(float{});
  else
    run(c10::BFloat16{});
  return out;
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             int64_t layer, int64_t first_slot, double scale) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "prefill_attention: float32 or bfloat16 only, got ", dt);
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.device().is_cpu(),
              "prefill_attention: q must be a contiguous CPU tensor [T, heads, hd]");
  const int64_t T = q.size(0), heads = q.size(1), hd = q.size(2);
  for (const auto* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == dt && c->is_contiguous() && c->dim() == 4 &&
                    c->size(3) == hd && c->sizes() == k_cache.sizes() && layer >= 0 && layer < c->size(0),
                "prefill_attention: caches must be contiguous [layers, groups, capacity, ", hd,
                "] tensors of q's dtype with layer ", layer);
  const int64_t G = k_cache.size(1), C = k_cache.size(2);
  TORCH_CHECK(G > 0 && heads % G == 0, "prefill_attention: ", heads, " query heads for ", G, " kv groups");
  TORCH_CHECK(first_slot >= 0 && first_slot + T <= C, "prefill_attention: rows ", first_slot, "..",
              first_slot + T, " outside cache capacity ", C);
  at::Tensor out = at::empty({T, heads, hd}, q.options());
  const int64_t hpg = heads / G;
  auto run = [&](auto type_tag) {
    using D = decltype(type_tag);
    const D* qp = static_cast<const D*>(q.data_ptr());
    const D* kc = static_cast<const D*>(k_cache.data_ptr());
    const D* vc = static_cast<const D*>(v_cache.data_ptr());
    D* op = static_cast<D*>(out.data_ptr());
    // Row r attends over first_slot + r + 1 keys: rows are taken alternately from both ends so that
    // the threads' contiguous ranges of tasks carry about the same work.
    at::parallel_for(0, T * G, 1, [&](int64_t t0, int64_t t1) {
      thread_local Scratch sc;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i = t / G, g = t % G, r = (i % 2 == 0) ? i / 2 : T - 1 - i / 2;
        const int64_t base = (layer * G + g) * C * hd;
        Task task{qp + (r * heads + g * hpg) * hd, kc + base, vc + base, op + (r * heads + g * hpg) * hd,
                  first_slot + r + 1, hd, hpg, static_cast<float>(scale)};
        attend<D>(task, sc);
      }
    });
  };
  if (dt == at::kFloat)
    run(float{});
  else
    run(c10::BFloat16{});
  return out;
}

}  // namespace glm
