"""The public facade: `load` (a checkpoint directory, with the deployment's device and CPU policy)
returns a `GLM` (tokenizer + model + engine), whose `generate` returns a `Stream`, one request's text
chunks, finish details and statistics."""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
import weakref

import torch

from .cpu import kernels
from .device import resolve as resolve_device
from .engine import Engine, EngineConfig
from .errors import EngineError, InputError
from .kvpool import KVCache
from .loader import load_model
from .sampling import SamplingParams
from .sequence import Sequence

log = logging.getLogger("glm")

# Per family: a mark of the other ChatGLM generation's prompt format (GLM.format_warning).
OTHER_FORMAT = {"chatglm2": "[Round 0]\n", "chatglm": "[Round 1]\n\n", "chatglm3": "[Round "}


def load(path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         quantize: int | None = None, int8_activations: bool = False, backend: str | None = None, *,
         require_kernels: bool = False, threads: int | None = None) -> "GLM":
    """Load a ChatGLM checkpoint directory; returns a GLM ready to generate.

    device: "cpu", "cuda", or "auto" (the GPU in fp16 when torch can use it, else the CPU in
    float32; an NVIDIA GPU torch cannot use raises glm.DeviceError, see glm.device).
    int8_activations (CPU, int4 checkpoints, float32): opt into the faster int8-activation linears
    (glm.ops.TorchOps); it changes the numerics, so it is off by default, and it is a CPU option:
    a model that loads on a GPU computes without it.
    backend: "torch" (torch ops, and the CPU kernels where they serve) or "triton" (glm.gpu's
    kernels, fp16); None picks "triton" on CUDA when its self-test passes, else "torch". On the CPU
    "triton" needs TRITON_INTERPRET=1 and builds exactly the model CUDA would. The choice is made
    once, at load: the model gets the ops that compute it (model.ops).
    require_kernels (CPU): raise glm.KernelError, saying why, when the CPU kernels cannot be used,
    instead of computing on the torch fallback at a fraction of the speed.
    threads (CPU): torch's intra-op threads (None: torch's default).
    """
    device = resolve_device(device)
    if device.type == "cpu":
        _use_cpu(require_kernels, threads)
    int8_activations = int8_activations and device.type == "cpu"
    on = f"{device.type} (fp16)" if device.type == "cuda" and dtype in (None, torch.float16) else device.type
    log.info("loading checkpoint %s on %s%s", path, on, " with int8 activations" if int8_activations else "")
    loaded = load_model(path, device, dtype, quantize, int8_activations, backend)
    return GLM(loaded.config, loaded.tokenizer, loaded.model, loaded.device)


def _use_cpu(require_kernels: bool, threads: int | None) -> None:
    if require_kernels:
        kernels.require()
    log.info("kernels: %s", kernels.status())
    if threads:
        torch.set_num_threads(threads)
    log.info("cpu: %d threads, OMP_WAIT_POLICY=%s", torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY"))


class GLM:
    def __init__(self, config, tokenizer, model, device: torch.device):
        self.config, self.tokenizer, self.model, self.device = config, tokenizer, model, device
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def chat_defaults(self) -> dict:
        """What a request that leaves them out gets: a first-turn prompt in this model's own format
        and its family's sampling defaults (keys: prompt, temperature, top_p)."""
        return dict(prompt=self.tokenizer.build_prompt("你好"), **self.tokenizer.chat_defaults)

    @property
    def engine(self) -> Engine:
        """The engine (EngineConfig.from_env() unless use_engine chose another); its loop starts with
        the first generate(), or with engine.start()."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = self._new_engine(EngineConfig.from_env())
            return self._engine

    def format_warning(self, prompt: str) -> str | None:
        """What to tell a caller whose prompt carries the other ChatGLM generation's format; None if not."""
        mark = OTHER_FORMAT[self.config.family]
        if mark not in prompt:
            return None
        return (f"the prompt contains {mark!r}, the other ChatGLM generation's format; this "
                f"{self.config.family} model expects e.g. {self.chat_defaults['prompt']!r}")

    def serve(self, config: EngineConfig | None = None) -> Engine:
        """A new engine ready for a server's first request: on a GPU every kernel variant compiled
        and the decode graphs captured (nothing compiles inside a request), the loop started, and one
        token generated so that the first request does not pay for lazy initialisation."""
        engine = self.use_engine(config)
        if self.device.type == "cuda":
            t0 = time.monotonic()
            engine.warm_up()
            log.info("GPU warm-up done in %.1fs", time.monotonic() - t0)
        t0 = time.monotonic()
        for _ in self.generate(self.chat_defaults["prompt"], max_new_tokens=1, temperature=0.0, seed=0):
            pass
        log.info("warm-up done in %.2fs", time.monotonic() - t0)
        return engine

    def use_engine(self, config: EngineConfig | None = None, **fields) -> Engine:
        """Replace the engine (e.g. a server's EngineConfig.from_env()); returns it, not yet started."""
        with self._engine_lock:
            if self._engine is not None:
                self._stop_engine.detach()
                self._engine.stop()
            self._engine = self._new_engine(config, **fields)
            return self._engine

    def _new_engine(self, config: EngineConfig | None, **fields) -> Engine:
        engine = Engine(self.model, self.tokenizer, self.config, self.device, config, **fields)
        # The loop thread holds the engine, not this object: a GLM that is dropped stops its loop.
        self._stop_engine = weakref.finalize(self, engine.stop)
        self._stop_engine.atexit = False
        return engine

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """float32 logits [len(ids), vocab] from one prefill pass."""
        if not ids:
            raise InputError("ids must not be empty")
        if len(ids) > self.config.max_context:
            raise InputError(f"{len(ids)} tokens exceed the model's context of {self.config.max_context}")
        cache = KVCache(self.config, len(ids), self.device, self.dtype)
        tokens = torch.tensor([ids], device=self.device)
        return self.model(tokens, [0], [cache])[0].float().cpu()

    def generate(self, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.8,
                 top_p: float = 0.8, top_k: int = 0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop=(), fit_context: bool = False,
                 cache_key: str | None = None) -> "Stream":
        """Stream the reply to a raw prompt (in the model's own format) as text chunks.

        cache_key: the conversation's secret; the request reuses only the prefix cache's entries that
        requests with the same key left (glm.engine: without a key, nothing unless the engine shares).

        fit_context: lower max_new_tokens to the room the prompt leaves in the model's context
        (the Stream's max_new_tokens says what was used) instead of refusing the request.
        """
        if not isinstance(prompt, str) or not prompt:
            raise InputError("prompt must be a non-empty string")
        # Tokenizing takes tens of bytes per token: a prompt that cannot fit is refused before it.
        if (least := self.tokenizer.min_tokens(prompt)) >= self.config.max_context:
            raise InputError(f"prompt is too long: {len(prompt)} characters are at least {least} tokens, but the "
                             f"model's context is {self.config.max_context} tokens (prompt + new tokens); "
                             f"shorten the prompt")
        ids = self.tokenizer.encode(prompt)
        if fit_context:
            room = self.config.max_context - len(ids)
            if room < 1:
                raise InputError(f"prompt is too long: {len(ids)} tokens, but the model's context is "
                                 f"{self.config.max_context} tokens (prompt + new tokens); shorten the prompt")
            max_new_tokens = min(max_new_tokens, room)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, repetition_penalty=repetition_penalty, seed=seed,
                                stop=(stop,) if isinstance(stop, str) else tuple(stop))
        engine = self.engine
        engine.start()
        return Stream(engine, engine.submit(ids, params, cache_key=cache_key))


class Stream:
    """Iterator of text chunks for one request; finish details and statistics once it is exhausted.

    The engine's thread produces the chunks; a reader only waits for them. It never waits forever:
    while no chunk comes it checks that the engine is alive, and a dead engine ends the stream with
    the engine's error (one whose loop is not running raises EngineError).
    """

    POLL_S = 0.5  # how often a waiting reader checks that the engine is still alive

    def __init__(self, engine: Engine, seq: Sequence):
        self.engine, self.seq = engine, seq

    def __iter__(self):
        return self

    def __next__(self) -> str:
        while True:
            try:
                chunk = self.seq.read(timeout=self.POLL_S)
            except queue.Empty:
                self._check_engine()
                continue
            if chunk is None:
                raise StopIteration
            return chunk

    def __aiter__(self):
        loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self.seq.on_output(lambda: loop.call_soon_threadsafe(self._ready.set))
        return self

    async def __anext__(self) -> str:
        # Always suspend once: when the engine runs ahead, chunks are ready at every call, and a
        # reader that never suspends could not be cancelled by its server until the reply ends.
        await asyncio.sleep(0)
        while True:
            try:
                chunk = self.seq.read(timeout=0)
            except queue.Empty:
                self._ready.clear()
                try:  # nothing arrived between the read and the clear, so a wake-up will come
                    chunk = self.seq.read(timeout=0)
                except queue.Empty:
                    try:
                        await asyncio.wait_for(self._ready.wait(), self.POLL_S)
                    except asyncio.TimeoutError:
                        self._check_engine()
                    continue
            if chunk is None:
                raise StopAsyncIteration
            return chunk

    def _check_engine(self) -> None:
        self.engine.fail_if_stopped(self.seq)
        if not self.engine.threaded and not self.seq.done:
            raise EngineError("the engine's loop is not running: nothing will produce this stream's text "
                              "(GLM.generate starts it; a bare Engine needs start())")

    def cancel(self) -> None:
        """Stop the request; never waits for the engine. A no-op once it has ended."""
        if not self.seq.done:
            self.engine.cancel(self.seq)

    close = cancel

    def __del__(self):
        if not self.seq.done:
            self.engine.cancel(self.seq)

    # ---- finish details and statistics ----
    @property
    def prompt_tokens(self) -> int:
        return len(self.seq.prompt_ids)

    @property
    def cached_prompt_tokens(self) -> int:
        """Prompt tokens whose KV came from the prefix cache instead of being prefilled (only ever
        entries of the request's own scope)."""
        return self.seq.cached_tokens

    @property
    def max_new_tokens(self) -> int:
        return self.seq.params.max_new_tokens

    @property
    def new_tokens(self) -> int:
        return self.seq.new_tokens

    @property
    def token_ids(self) -> list[int]:
        """The generated ids (without the prompt)."""
        return self.seq.tokens[len(self.seq.prompt_ids):]

    @property
    def finish_reason(self) -> str | None:
        """"eos", "stop", "length", "canceled" or "error"; None while it runs."""
        return self.seq.finish_reason

    @property
    def seed(self) -> int:
        return self.seq.params.seed

    @property
    def peak_batch(self) -> int:
        """Most sequences decoded in one step together with this one (1 = it ran alone)."""
        return self.seq.peak_batch

    @property
    def elapsed(self) -> float:
        """Seconds from submission to the end of the request (or to now while it runs)."""
        end = self.seq.t_done if self.seq.t_done is not None else time.perf_counter()
        return end - self.seq.t_submit

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.seq.t_first is None else self.seq.t_first - self.seq.t_submit

    @property
    def tokens_per_second(self) -> float:
        elapsed = self.elapsed
        return self.new_tokens / elapsed if elapsed > 0 else 0.0

    def metrics(self) -> dict:
        """What a serving platform records per prediction (Replicate's names)."""
        out = {"input_token_count": self.prompt_tokens, "output_token_count": self.new_tokens,
               "tokens_per_second": round(self.tokens_per_second, 3)}
        if self.time_to_first_token is not None:
            out["time_to_first_token"] = round(self.time_to_first_token, 4)
        return out

    def summary(self) -> str:
        """One log line: sizes, timings, batching, seed and how it ended."""
        ttft = f"{self.time_to_first_token:.3f}s" if self.time_to_first_token is not None else "n/a"
        return (f"prompt_tokens={self.prompt_tokens} new_tokens={self.new_tokens} time_to_first_token={ttft} "
                f"cached_prompt_tokens={self.cached_prompt_tokens} "
                f"tokens_per_s={self.tokens_per_second:.2f} peak_batch={self.peak_batch} seed={self.seed} "
                f"finish_reason={self.finish_reason or 'canceled'}")
