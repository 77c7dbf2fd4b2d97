"""Cog predictor for THUDM's ChatGLM models: Cog's adapter to the `glm` engine, and no more.

setup() reads the deployment's settings (glm.settings: a value it cannot use fails setup with one
line naming the variable) and hands them to glm.load and the engine; predict() checks the inputs,
submits one request and streams its text. Model logic and device policy live in glm/; what coglet
0.23.1 needs worked around (streaming, cancel, shutdown, logs) lives in cog_compat.py.

Concurrency: predict() is async, so the server runs up to COG_MAX_CONCURRENCY predictions at once
(cog.yaml `concurrency.max`; beyond it the server answers 409), and the engine thread batches them
into one forward step. Inputs mirror the public Replicate model nomagick/chatglm2-6b-int4 (prompt,
max_tokens, temperature, top_p) plus top_k, repetition_penalty, stop_sequences, seed and cache_key
(the conversation's prefix-cache scope, glm.prefix_cache).
"""
from __future__ import annotations

import contextvars
import functools
import os
import time
from typing import Iterator, List, Optional

# OpenMP's default wait policy spins idle threads between parallel regions: beside any busy process
# on the same cores, a batch then waits for threads that spin instead of the one that works.
# Read once when torch loads libgomp, so it is set before the first torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cog  # noqa: E402
from cog import BasePredictor, ConcatenateIterator, Input  # noqa: E402

import cog_compat  # noqa: E402
import glm  # noqa: E402
from glm import settings  # noqa: E402

DEFAULT_WEIGHTS_DIR = "weights"
# The model download-weights fetches by default; preferred when weights/ holds several.
DEFAULT_MODEL_NAME = "chatglm2-6b-int4"
# cog builds the image's input schema by reading this file, not by running it: every Input(...)
# keyword below is a literal (tests/service/test_static_schema.py reads them by cog's rules), so the schema
# repeats these bounds and a test checks they agree.
MAX_SEED = glm.MAX_SEED  # the engine's seeds, so a logged seed can always be passed back
# Largest context of any supported checkpoint (the -32k variants); the real limit
# for the loaded checkpoint comes from the engine (model.config.max_context).
MAX_TOKENS_LIMIT = 32768
# Predictions served at once (the server's slots; cog.yaml concurrency.max) = the engine's batch size.
DEFAULT_CONCURRENCY = 8
# After the server starts shutting down, running predictions get this long before they are cancelled.
DEFAULT_DRAIN_SECONDS = 30
MAX_DRAIN_SECONDS = 3600
# Input sizes the schema refuses before a byte reaches predict() (Input max_length repeats them:
# tests/service/test_static_schema.py checks that they agree). A prompt longer than MAX_PROMPT_CHARS cannot
# fit the largest context of any checkpoint (32768 tokens of at most 16 characters each); stop
# strings are at most MAX_STOP_STRINGS of MAX_STOP_CHARS, with room for separators and spaces.
MAX_PROMPT_CHARS = 1 << 20
MAX_STOP_SEQUENCES_CHARS = 8192
MAX_CACHE_KEY_CHARS = 256


def log(msg: str) -> None:
    """One log line; coglet captures stdout into the prediction's / setup's logs."""
    print(f"[chatglm] {msg}", flush=True)


def parse_stop_sequences(text: str) -> List[str]:
    """Replicate style: comma-separated; surrounding spaces trimmed; empty items dropped.
    Refused before splitting when longer than any valid list (a split costs ~6 bytes per comma)."""
    if not text:
        return []
    if len(text) > MAX_STOP_SEQUENCES_CHARS:
        raise glm.InputError(f"stop_sequences is {len(text)} characters, at most {MAX_STOP_SEQUENCES_CHARS}")
    return [s.strip(" ") for s in text.split(",") if s.strip(" ")]


def weights_root() -> str:
    return os.environ.get("COG_WEIGHTS") or DEFAULT_WEIGHTS_DIR


def _with_seed(error: Exception, seed: int) -> str:
    """A failed prediction's error: coglet returns no logs with it, so the seed goes in the text."""
    return f"{error} (seed {seed}; pass seed={seed} to reproduce)"


class Predictor(BasePredictor):
    def setup(self) -> None:
        cog_compat.route_logs("glm")
        # Every setting read before the weights load: a bad one fails setup at once, by name.
        concurrency = settings.integer("COG_MAX_CONCURRENCY", DEFAULT_CONCURRENCY, at_least=1)
        engine_config = glm.EngineConfig.from_env(max_batch=concurrency)  # KV budget, prefix cache, watchdog
        self.drain_seconds = settings.number("GLM_DRAIN_SECONDS", DEFAULT_DRAIN_SECONDS, at_most=MAX_DRAIN_SECONDS)
        port = settings.integer("PORT", 5000, at_least=1, at_most=65535)
        test_hang_s = settings.number("GLM_TEST_HANG_SECONDS", 0)
        # A GPU that torch cannot use, or kernels required but unusable, fail setup with one line
        # (health SETUP_FAILED) instead of serving at a fraction of the speed. int8 activations (a
        # CPU opt-in: 2-5x faster prefill and batches, other numerics) apply only on the CPU.
        policy = dict(device=settings.choice("GLM_DEVICE", "auto", ("auto", "cpu", "cuda")),  # auto: the GPU if usable
                      require_kernels=settings.flag("GLM_REQUIRE_KERNELS"),
                      int8_activations=settings.flag("GLM_INT8_ACTIVATIONS"),
                      threads=settings.integer("GLM_THREADS", None, at_least=1))
        path = glm.find_checkpoint(weights_root(), DEFAULT_MODEL_NAME)
        try:
            self.model = glm.load(path, **policy)
        except glm.CheckpointError as e:
            # One clear line in the server's setup logs; no engine traceback chain.
            raise glm.WeightsError(f"cannot load checkpoint {path}: {e}") from None
        except glm.KernelError as e:
            raise glm.KernelError(f"{e} (GLM_REQUIRE_KERNELS=1)") from None
        # Inputs left empty take the loaded model's own defaults (prompt, temperature, top_p).
        self.defaults = self.model.chat_defaults
        # One engine thread batches every running prediction; KV cache is reserved per request
        # (prompt + max_tokens) within the budget: a request that does not fit yet waits.
        engine = self.model.serve(engine_config)
        log(f"engine: up to {concurrency} sequences per step, KV budget {engine.kv_budget_tokens} tokens")
        if not cog_compat.watch_server_shutdown(port, self._drain):
            log("warning: cannot see the server's port; a shutdown waits for running predictions to end")
        if test_hang_s:
            _inject_test_hang(engine, test_hang_s)

    def _drain(self) -> None:
        """The server is shutting down: let running predictions end, cancel what runs past the drain."""
        engine = self.model.engine
        log(f"server shutting down: {engine.pending} running prediction(s) get {self.drain_seconds:g}s to end")
        engine.drain(self.drain_seconds)

    @cog.streaming
    async def predict(
        self,
        prompt: Optional[str] = Input(
            description=r"Raw prompt in the model's own format; empty for the loaded model's first-turn greeting. ChatGLM2: '[Round 1]\n\n问：...\n\n答：', earlier rounds before it as '[Round N]\n\n问：...\n\n答：...\n\n'. ChatGLM-6B: the bare question, or '[Round 0]\n问：...\n答：...\n' rounds before '[Round N]\n问：...\n答：'.",
            default=None,
            min_length=1,
            max_length=1048576,
        ),
        max_tokens: int = Input(
            description="Maximum number of new tokens to generate. Clamped to the context left after the prompt (8192 tokens in all for chatglm2-6b-int4, 2048 for ChatGLM-6B, 32768 for the -32k models).",
            default=2048,
            ge=1,
            le=32768,
        ),
        temperature: Optional[float] = Input(
            description="Sampling temperature; higher is more random, 0 means greedy decoding. Empty for the loaded model's default: 0.75 for ChatGLM2, 0.95 for ChatGLM-6B.",
            default=None,
            ge=0.0,
            le=5.0,
        ),
        top_p: Optional[float] = Input(
            description="Nucleus sampling: sample from the smallest set of tokens whose probabilities add up to top_p; 0 keeps only the most likely token (greedy). Empty for the loaded model's default: 0.8 for ChatGLM2, 0.7 for ChatGLM-6B.",
            default=None,
            ge=0.0,
            le=1.0,
        ),
        top_k: int = Input(
            description="Sample only from the top_k most likely tokens; 0 turns it off.",
            default=0,
            ge=0,
            le=1000,
        ),
        repetition_penalty: float = Input(
            description="Penalty for tokens already in the prompt or output; 1.0 turns it off.",
            default=1.0,
            ge=1.0,
            le=2.0,
        ),
        stop_sequences: str = Input(
            description="Comma-separated strings that end generation when produced (not included in the output), e.g. '<end>,问：'. Empty for none. At most 32 strings of 128 characters.",
            default="",
            max_length=8192,
        ),
        seed: Optional[int] = Input(
            description="Random seed for reproducible sampling. Leave empty for a random seed; the seed used is written to the logs.",
            default=None,
            ge=0,
            le=4294967295,
        ),
        cache_key: str = Input(
            description="A secret of your own (e.g. a random UUID) that you send again with each turn of one conversation: a request reuses the server's cached computation of an earlier turn only when its cache_key is the same, so the next turn starts faster. Empty: nothing is reused and nothing is kept for later (unless the deployment shares one cache among all requests). Never logged.",
            default="",
            max_length=256,
        ),
    ) -> ConcatenateIterator[str]:
        defaults = self.defaults  # the loaded model's own prompt, temperature and top_p
        prompt = defaults["prompt"] if prompt is None else prompt
        temperature = defaults["temperature"] if temperature is None else temperature
        top_p = defaults["top_p"] if top_p is None else top_p
        max_tokens, top_k = cog_compat.whole_number("max_tokens", max_tokens), cog_compat.whole_number("top_k", top_k)
        seed = None if seed is None else cog_compat.whole_number("seed", seed)
        if not prompt.strip():
            raise ValueError("prompt is empty: give the text to continue, e.g. " + repr(defaults["prompt"]))
        if warning := self.model.format_warning(prompt):
            log(f"warning: {warning}")
        # Drawn here, not by the engine, so that a request refused before it runs still names its seed.
        drawn = seed is None
        seed = glm.random_seed() if drawn else seed
        if top_p == 0:
            log("top_p=0: greedy decoding")  # as on the public model; the engine reads it so too
        request = functools.partial(
            self.model.generate, prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed, stop=tuple(parse_stop_sequences(stop_sequences)),
            fit_context=True, cache_key=cache_key or None)
        try:  # tokenizing a long prompt is CPU work: off the server's event loop, the server's cancel wired
            stream = await cog_compat.submit(request, log)
        except glm.InputError as e:
            raise ValueError(_with_seed(e, seed)) from None
        log(f"seed {stream.seed}" + (f" (random; pass seed={stream.seed} to reproduce)" if drawn else ""))
        if stream.max_new_tokens < max_tokens:
            log(f"max_tokens {max_tokens} clamped to {stream.max_new_tokens}: prompt has {stream.prompt_tokens} "
                f"tokens of the {self.model.config.max_context}-token context")
        # A (sync) generator, streamed by the server (cog_compat.py), which iterates it on another
        # thread: its log lines and metrics reach this prediction only from within predict()'s
        # context (coglet routes them by a ContextVar).
        return self._stream(stream, seed, contextvars.copy_context())

    def healthcheck(self) -> bool:
        """coglet's user health check: False (server status UNHEALTHY) once the engine loop has died."""
        return self.model.engine.healthy

    def _stream(self, stream, seed: int, context: contextvars.Context) -> Iterator[str]:
        try:
            yield from stream
            if stream.finish_reason == "canceled":
                raise cog.CancelationException()  # reported as "canceled", not "succeeded"
        except cog.CancelationException:
            raise
        except Exception as e:  # the engine's error for this sequence (its own, never a neighbour's)
            raise RuntimeError(_with_seed(e, seed)) from e
        finally:
            stream.cancel()  # no-op when finished; frees the sequence if the server stopped reading
            context.run(_report, stream)


def _inject_test_hang(engine, hang: float) -> None:
    """GLM_TEST_HANG_SECONDS (tests only): the first step after setup sleeps this long, a stuck step
    for the watchdog to see. Read once at setup from the server's environment; no request can set it."""
    log(f"GLM_TEST_HANG_SECONDS={hang:g}: the next engine step will hang (a test's fault injection)")

    def hang_once(batch) -> None:
        engine.before_run = None
        time.sleep(hang)

    engine.before_run = hang_once


def _report(stream) -> None:
    """The prediction's stats line and metrics (run in the prediction's context)."""
    log(stream.summary())
    for name, value in stream.metrics().items():
        cog.current_scope().record_metric(name, value)
