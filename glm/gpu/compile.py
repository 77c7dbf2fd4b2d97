"""Ahead-of-time compile of every Triton kernel of the GPU path for a target GPU, without a GPU.

Spec format (every kernel module of glm.gpu exports `COMPILE_SPECS: list[KernelSpec]`, one entry
per kernel x shape class it launches):

    from glm.gpu.compile import KernelSpec

    COMPILE_SPECS = [
        KernelSpec(
            kernel=_gemv_kernel,                    # the @triton.jit function
            shape_class="int4 decode M<=8",         # what launch this stands for (printed)
            signature={"x": "*fp16", "w": "*i8", "y": "*fp16", "M": "i32", "N": "i32",
                       "K": "i32", "BITS": "constexpr", "BLOCK_N": "constexpr"},
            constexprs={"BITS": 4, "BLOCK_N": 16},  # value of every "constexpr" argument
            aligned=("x", "w", "y", "K"),           # args the launcher passes 16-divisible
            num_warps=4, num_stages=2,              # as the launcher passes them
            no_spills=True,                         # decode kernels: a spill fails the compile
        ),
    ]

`signature` names every argument of the kernel in order with its Triton type ("*fp16", "*fp32",
"*i8", "*i32", "i32", "i64", "fp32", "constexpr"); arguments the launcher passes as None get
type "constexpr" and value None. `aligned` lists the pointer and integer arguments that Triton's
launcher would specialize as divisible by 16 (pointers from torch allocations, dimensions that
are multiples of 16), so the compiled code is the code that runs.

`python -m glm.gpu compile --arch 75` compiles every spec of every module in MODULES with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, runs ptxas -v on the PTX
for registers and spills, prints one line per spec and fails if any spec fails.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Kernel modules of the GPU path, imported by name; one that does not exist yet is skipped.
MODULES = ("glm.gpu.linear", "glm.gpu.attention", "glm.gpu.pointwise")


@dataclass(frozen=True)
class KernelSpec:
    """One Triton kernel compiled for one shape class it is launched with."""
    kernel: Any
    shape_class: str
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    aligned: tuple[str, ...] = ()
    num_warps: int = 4
    num_stages: int = 2
    no_spills: bool = False
