"""`script/gpu-check`: one command that proves the GPU path on the GPU it runs on (see __main__.py).

Modules, one per concern: report (items, statuses, time limits, the JSON), environment, kernels
(device vs interpreter, bitwise invariants), correctness (device tests, reference vectors, self-test,
engine-level invariance and cache reuse, CUDA graphs), speed (full-size checkpoint figures), server
(a streamed prediction through the real Cog server)."""
