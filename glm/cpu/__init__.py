"""The CPU path: fused C++ kernels (csrc/), their build and load (kernels.py) and the model's
operations on them (ops.py). Mirrors glm/gpu (the Triton kernels and their ops)."""
