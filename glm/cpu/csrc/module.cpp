// The Python module of the fused CPU kernels, and the instruction-set path they all run on.
//
// One build runs on every x86-64 CPU: each vector path is compiled with its own function target
// (common.h) and only entered when the CPU has it. The path in use starts as the best this CPU has;
// GLM_KERNEL_ISA (at import) or set_isa() can lower it, so tests run every path on one machine.

#include "common.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

namespace {

const char* const kIsaNames[] = {"scalar", "avx2", "avx512", "avx512bf16"};
constexpr int kIsaCount = 4;

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
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return glm::kAvx512Bf16;
  if (avx512) return glm::kAvx512;
  if (avx2) return glm::kAvx2;
#endif
  return glm::kScalar;
}

const int g_max_isa = detect_isa();

bool detect_vnni() {
#ifdef GLM_X86
  return g_max_isa >= glm::kAvx512 && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

const bool g_has_vnni = detect_vnni();

int initial_isa() {
  int isa = g_max_isa;
  if (const char* env = std::getenv("GLM_KERNEL_ISA")) {
    for (int i = 0; i < kIsaCount; ++i)
      if (env == std::string(kIsaNames[i])) isa = std::min(i, g_max_isa);
  }
  return isa;
}

std::atomic<int> g_isa{initial_isa()};

std::string isa() { return kIsaNames[g_isa.load()]; }
std::string max_isa() { return kIsaNames[g_max_isa]; }

void set_isa(const std::string& name) {
  for (int i = 0; i < kIsaCount; ++i) {
    if (name == kIsaNames[i]) {
      TORCH_CHECK(i <= g_max_isa, "set_isa: ISA '", name, "' is not supported by this CPU (max '",
                  kIsaNames[g_max_isa], "')");
      g_isa.store(i);
      return;
    }
  }
  TORCH_CHECK(false, "set_isa: unknown ISA '", name, "' (scalar, avx2, avx512, avx512bf16)");
}

}  // namespace

namespace glm {
Isa current_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }
bool cpu_has_vnni() { return g_has_vnni; }
}  // namespace glm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU kernels of the glm engine: quantized linears, decode attention, RMSNorm, SwiGLU";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("int4_linear", &glm::int4_linear, "y = x @ dequant(qweight int4 [N,K/2], scale [N]).T + bias",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("bias") = py::none(), nogil);
  m.def("int8_linear", &glm::int8_linear, "y = x @ dequant(qweight int8 [N,K], scale [N]).T + bias",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("bias") = py::none(), nogil);
  m.def("int4_linear_i8", &glm::int4_linear_i8,
        "y = quant8(x) @ dequant(qweight int4 [N,K/2], scale [N]).T + bias, x quantized per row",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("bias") = py::none(), nogil);
  m.def("has_vnni", &glm::cpu_has_vnni, "whether the CPU has AVX-512 VNNI (int4_linear_i8's fast path)");
  m.def("half_linear", &glm::half_linear, "y = x @ weight(fp16/bf16 [N,K]).T + bias", py::arg("x"),
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
  m.def("isa", &isa, "ISA path currently used");
  m.def("max_isa", &max_isa, "best ISA path supported by this CPU");
  m.def("set_isa", &set_isa, "force an ISA path (scalar, avx2, avx512, avx512bf16) for testing",
        py::arg("name"));
}
