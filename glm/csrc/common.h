// Declarations shared by the extension's sources (qlinear.cpp holds the module definition).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace glm {

// ISA path in use: 0 scalar, 1 avx2, 2 avx512, 3 avx512bf16 (qlinear.cpp; set_isa() changes it).
int current_isa();

// attention.cpp: one decode step of attention for a batch of sequences, each over its own cache.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                            int64_t layer, const std::vector<int64_t>& slots, double scale);

}  // namespace glm
