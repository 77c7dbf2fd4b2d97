"""Cog predictor for THUDM's ChatGLM models on top of the `glm` engine.

Thin by design: validate inputs, call the engine, stream its text, log. All model logic
(tokenizer, sampling, stop strings, context limits) lives in glm/.

predict() is a plain generator, one prediction at a time: with coglet 0.23.1 an async generator's
output is only sent when it ends (no streaming), and an async predict() returning a generator
streams but cannot be cancelled. The engine batches concurrent sequences (glm.engine); serving
them concurrently waits on a Cog server that streams async generators.

Inputs mirror the public Replicate model nomagick/chatglm2-6b-int4
(prompt, max_tokens, temperature, top_p) plus top_k, repetition_penalty,
stop_sequences and seed.
"""
from __future__ import annotations

import os
import secrets
import time
from typing import Iterator, List, Optional

import cog
from cog import BasePredictor, ConcatenateIterator, Input

import glm

# Per family: THUDM's chat() defaults, the prompt of a first turn, and a mark of the other family's format.
FAMILY = {
    "chatglm2": dict(prompt="[Round 1]\n\n问：你好\n\n答：", temperature=0.75, top_p=0.8, other_format="[Round 0]\n"),
    "chatglm": dict(prompt="你好", temperature=0.95, top_p=0.7, other_format="[Round 1]\n\n"),
}
DEFAULT_WEIGHTS_DIR = "weights"
# The model download-weights fetches by default; preferred when weights/ holds several.
DEFAULT_MODEL_NAME = "chatglm2-6b-int4"
MAX_SEED = 2**32 - 1
# Largest context of any supported checkpoint (the -32k variants); the real limit
# for the loaded checkpoint comes from the engine (model.config.max_context).
MAX_TOKENS_LIMIT = 32768


def log(msg: str) -> None:
    """One log line; coglet captures stdout into the prediction's / setup's logs."""
    print(f"[chatglm] {msg}", flush=True)


class WeightsError(RuntimeError):
    """Setup cannot find or load the checkpoint. The message says what to do."""


def _has_config(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def find_checkpoint(root: str) -> str:
    """Locate the checkpoint directory under `root`, deterministically.

    - `root` itself when it holds config.json;
    - else its one subdirectory holding config.json (as script/download-weights writes
      weights/<name>/). When several do, the default model's directory wins if present,
      otherwise the first in sorted name order; the choice is logged.
    Hidden entries (download-weights' in-progress temp dirs start with '.') are ignored.
    """
    if "://" in root:
        raise WeightsError(
            f"COG_WEIGHTS={root!r} is a URL; this predictor needs a local checkpoint directory "
            "(run script/download-weights first)"
        )
    if not os.path.isdir(root):
        raise WeightsError(
            f"weights directory {root!r} does not exist: run `script/download-weights` "
            "or set COG_WEIGHTS to a checkpoint directory"
        )
    if _has_config(root):
        return root
    candidates = sorted(
        name
        for name in os.listdir(root)
        if not name.startswith(".") and _has_config(os.path.join(root, name))
    )
    if not candidates:
        raise WeightsError(
            f"no checkpoint in {root!r}: expected config.json there or in a subdirectory "
            "such as weights/chatglm2-6b-int4/ (run `script/download-weights`)"
        )
    chosen = DEFAULT_MODEL_NAME if DEFAULT_MODEL_NAME in candidates else candidates[0]
    if len(candidates) > 1:
        log(f"several checkpoints in {root}: {', '.join(candidates)}; using {chosen}")
    return os.path.join(root, chosen)


def parse_stop_sequences(text: str) -> List[str]:
    """Replicate style: comma-separated; surrounding spaces trimmed; empty items dropped."""
    if not text:
        return []
    return [s.strip(" ") for s in text.split(",") if s.strip(" ")]


def weights_root() -> str:
    return os.environ.get("COG_WEIGHTS") or DEFAULT_WEIGHTS_DIR


def checkpoint_family(root: str) -> str:
    """Family of the checkpoint setup() will load; 'chatglm2' while there is none."""
    try:
        return glm.ChatGLMConfig.from_file(os.path.join(find_checkpoint(root), "config.json")).family
    except (WeightsError, glm.CheckpointError):
        return "chatglm2"


# Input defaults follow the checkpoint baked into the image (read when the schema is built).
DEFAULTS = FAMILY[checkpoint_family(weights_root())]


class Predictor(BasePredictor):
    def setup(self) -> None:
        import torch

        path = find_checkpoint(weights_root())
        if torch.cuda.is_available():
            device, dtype = "cuda", torch.float16
        else:
            device, dtype = "cpu", None
        log(f"loading checkpoint {path} on {device}" + (" (fp16)" if dtype is not None else ""))
        t0 = time.monotonic()
        try:
            self.model = glm.load(path, device=device, dtype=dtype)
        except glm.CheckpointError as e:
            # One clear line in the server's setup logs; no engine traceback chain.
            raise WeightsError(f"cannot load checkpoint {path}: {e}") from None
        cfg = self.model.config
        self.family = FAMILY[cfg.family]
        log(f"loaded {cfg.family} checkpoint in {time.monotonic() - t0:.1f}s; max_context={cfg.max_context}")
        # One-token warm-up so the first request does not pay for lazy init.
        t0 = time.monotonic()
        for _ in self.model.generate(self.family["prompt"], max_new_tokens=1, temperature=0.0, seed=0):
            pass
        log(f"warm-up done in {time.monotonic() - t0:.2f}s")

    @cog.streaming
    def predict(
        self,
        prompt: str = Input(
            description="Raw prompt in the model's own format: ChatGLM2 '[Round 1]\\n\\n问：...\\n\\n答：' "
            "(earlier rounds go before it as '[Round N]\\n\\n问：...\\n\\n答：...\\n\\n'); ChatGLM-6B: the bare "
            "question, or '[Round 0]\\n问：...\\n答：...\\n' rounds before '[Round N]\\n问：...\\n答：'.",
            default=DEFAULTS["prompt"],
            min_length=1,
        ),
        max_tokens: int = Input(
            description="Maximum number of new tokens to generate. Clamped to the context "
            "left after the prompt (8192 tokens in all for chatglm2-6b-int4).",
            default=2048,
            ge=1,
            le=MAX_TOKENS_LIMIT,
        ),
        temperature: float = Input(
            description="Sampling temperature; higher is more random, 0 means greedy decoding.",
            default=DEFAULTS["temperature"],
            ge=0.0,
            le=5.0,
        ),
        top_p: float = Input(
            description="Nucleus sampling: sample from the smallest set of tokens whose "
            "probabilities add up to top_p. 0 keeps only the most likely token (greedy).",
            default=DEFAULTS["top_p"],
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
            description="Comma-separated strings that end generation when produced "
            "(not included in the output), e.g. '<end>,问：'. Empty for none.",
            default="",
        ),
        seed: Optional[int] = Input(
            description="Random seed for reproducible sampling. Leave empty for a random "
            "seed; the seed used is written to the logs.",
            default=None,
            ge=0,
            le=MAX_SEED,
        ),
    ) -> ConcatenateIterator[str]:
        if not prompt.strip():
            raise ValueError("prompt is empty: give the text to continue, e.g. " + repr(self.family["prompt"]))
        if self.family["other_format"] in prompt:
            log(f"warning: the prompt contains {self.family['other_format']!r}, the other ChatGLM generation's "
                f"format; this {self.model.config.family} model expects e.g. {self.family['prompt']!r}")
        model = self.model
        max_context = model.config.max_context
        prompt_tokens = len(model.tokenizer.encode(prompt))
        room = max_context - prompt_tokens
        if room < 1:
            raise ValueError(
                f"prompt is too long: {prompt_tokens} tokens, but the model's context is "
                f"{max_context} tokens (prompt + new tokens); shorten the prompt"
            )
        if max_tokens > room:
            log(
                f"max_tokens {max_tokens} clamped to {room}: prompt has {prompt_tokens} tokens "
                f"of the {max_context}-token context"
            )
            max_tokens = room
        if seed is None:
            seed = secrets.randbelow(MAX_SEED + 1)
            log(f"seed {seed} (random; pass seed={seed} to reproduce)")
        else:
            log(f"seed {seed}")
        if top_p == 0:
            # Accepted like on the public model, where top_p=0 keeps only the top token; the engine
            # takes top_p in (0, 1], so say it as what it means: greedy decoding.
            log("top_p=0: greedy decoding")
            temperature, top_p = 0.0, 1.0
        stream = model.generate(
            prompt,
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=tuple(parse_stop_sequences(stop_sequences)),
        )
        yield from self._stream(stream, seed)

    def _stream(self, stream, seed: int) -> Iterator[str]:
        t0 = time.monotonic()
        first = None
        try:
            for chunk in stream:
                if first is None:
                    first = time.monotonic()
                yield chunk
        finally:
            # Cancelled (or the client went away): the engine drops the sequence at its next step.
            stream.cancel()
            elapsed = time.monotonic() - t0
            reason = stream.finish_reason or "canceled"
            tps = stream.new_tokens / elapsed if elapsed > 0 else 0.0
            ttft = f"{first - t0:.3f}s" if first is not None else "n/a"
            log(
                f"prompt_tokens={stream.prompt_tokens} new_tokens={stream.new_tokens} "
                f"time_to_first_token={ttft} tokens_per_s={tps:.2f} seed={seed} finish_reason={reason}"
            )
