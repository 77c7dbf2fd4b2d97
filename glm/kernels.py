"""Compiled CPU kernels (placeholder until the C++ extension lands: always the torch fallback)."""


def get():
    return None
