"""glm: an inference engine for THUDM's ChatGLM family.

    import glm
    model = glm.load("weights/chatglm2-6b-int4")
    for chunk in model.generate("[Round 1]\\n\\n问：你好\\n\\n答：", max_new_tokens=64, temperature=0):
        print(chunk, end="")
"""
from .config import ChatGLMConfig
from .cpu.kernels import KernelError
from .device import DeviceError
from .errors import CheckpointError, EngineError, GLMError, InputError, WeightsError
from .sampling import MAX_SEED, SamplingParams, random_seed
from .loader import find_checkpoint
from .engine import EngineConfig
from .llm import GLM, Stream, load

__all__ = ["load", "find_checkpoint", "WeightsError", "GLM", "Stream", "EngineConfig", "ChatGLMConfig", "SamplingParams", "MAX_SEED", "random_seed", "GLMError", "CheckpointError", "InputError",
           "EngineError", "DeviceError", "KernelError"]
