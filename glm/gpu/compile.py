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
MODULES = ("glm.gpu.linear", "glm.gpu.mma", "glm.gpu.prefill", "glm.gpu.attention", "glm.gpu.pointwise")


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


@dataclass(frozen=True)
class CompileResult:
    module: str
    kernel: str
    shape_class: str
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def line(self) -> str:
        head = f"{self.module.rsplit('.', 1)[-1]}.{self.kernel} [{self.shape_class}]"
        if not self.ok:
            return f"FAIL {head}: {self.error}"
        return (f"ok   {head}: {self.registers} registers, spills {self.spill_stores} B stored / "
                f"{self.spill_loads} B loaded, {self.shared_bytes} B shared")


def collect_specs(modules=MODULES) -> list[tuple[str, KernelSpec]]:
    """(module name, spec) for every spec of every kernel module that exists."""
    import importlib
    specs = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # not written yet
            raise
        specs += [(name, spec) for spec in module.COMPILE_SPECS]
    return specs


def compile_spec(spec: KernelSpec, arch: int, module: str = "") -> CompileResult:
    """Compile one spec for sm_<arch>; registers and spills from ptxas -v on its PTX."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = spec.kernel
    name = fn.__name__
    try:
        names = list(fn.arg_names)
        if list(spec.signature) != names:
            raise ValueError(f"signature names {list(spec.signature)} != kernel arguments {names}")
        src = ast_source(spec)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        usage = ptxas_usage(compiled.asm["ptx"], arch)
    except Exception as e:  # report the failure of this spec and go on with the others
        return CompileResult(module, name, spec.shape_class, error=f"{type(e).__name__}: {_first_line(e)}")
    result = CompileResult(module, name, spec.shape_class, shared_bytes=compiled.metadata.shared, **usage)
    if spec.no_spills and (result.spill_stores or result.spill_loads):
        return CompileResult(module, name, spec.shape_class, error=(
            f"spills in a kernel that must not spill ({result.registers} registers, {result.spill_stores} B "
            f"stored / {result.spill_loads} B loaded)"))
    return result


def ast_source(spec: KernelSpec):
    """The compiler's source object for `spec` (Gluon kernels have their own)."""
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    names = list(spec.kernel.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.aligned
             if spec.signature[a] != "constexpr"}
    source = GluonASTSource if spec.kernel.is_gluon() else ASTSource
    return source(spec.kernel, spec.signature, spec.constexprs, attrs)


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """registers / spill_stores / spill_loads of the kernel in `ptx`, from Triton's bundled ptxas."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                              "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    if not regs or not spills:
        raise RuntimeError(f"unexpected ptxas output: {out!r}")
    return {"registers": int(regs[1]), "spill_stores": int(spills[1]), "spill_loads": int(spills[2])}


def compile_all(arch: int, modules=MODULES, out=print) -> bool:
    """Compile every spec, print one line each; True if all compiled (and decode kernels do not spill)."""
    results = [compile_spec(spec, arch, module) for module, spec in collect_specs(modules)]
    for r in results:
        out(r.line())
    failed = sum(not r.ok for r in results)
    out(f"sm_{arch}: {len(results) - failed}/{len(results)} kernels compiled")
    return failed == 0 and bool(results)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
