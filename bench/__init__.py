"""CPU benchmark: our ChatGLM2-6B engine vs. li-plus/chatglm.cpp (PyPI chatglm-cpp==0.4.2).

Run with ``python -m bench`` (see bench/__main__.py).
"""
