"""Hostile input, kept fixed: what the outside campaign sent, in-process and through the REAL server.

In-process: temperatures too small to sample, prompts that cannot fit the context, stop strings by
the thousand, absurd config.json values and code-running pickles. Through coglet 0.23.1 with 8 slots:
the same inputs beside normal requests (which must keep their exact solo output), whole-number
floats, the seed in a failed prediction's error, and a bounded property-based barrage (types,
bounds, unicode, huge and malformed bodies) that must never give a 5xx or stall the server.
coglet's own findings are the xfail(strict=True) tests at the end (docs/SERVICE.md, Security).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from reference import REFERENCE  # noqa: E402
from service_helpers import DEFAULT_PROMPT, assert_ready, reference, worker_rss_mb  # noqa: E402
from devtools.cogserver import CogServer  # noqa: E402

import glm  # noqa: E402
from glm.output import StopMatcher  # noqa: E402
from glm.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams, sample  # noqa: E402
from glm.tokenizer import ChatGLM2Tokenizer  # noqa: E402
from glm.tokenizer_v1 import ChatGLMTokenizer  # noqa: E402

REF = REFERENCE / "tokenizers"
POISON_TEMPERATURE = 3.966e-38  # the campaign's value: logits / T overflows float32 a few tokens in
CONCURRENCY = 8
NO_HISTORY = torch.empty(0, dtype=torch.long)


# ------------------------------------------------------------------------- 1. temperature
@pytest.mark.parametrize("t", [POISON_TEMPERATURE, 1e-30, 9.99e-6, 5e-324])
def test_unsamplable_temperature_is_greedy(t):
    assert SamplingParams(temperature=t).validate().temperature == 0.0


def test_smallest_sampled_temperature_is_kept():
    assert SamplingParams(temperature=1e-5).validate().temperature == 1e-5


def test_sample_never_raises_on_overflowing_scores():
    """Without validate() (the engine always validates; this is the net under it): scores that
    overflow to inf give the most likely token instead of multinomial's error."""
    logits = torch.tensor([3.0, 40.0, -2.0, 39.5])
    p = SamplingParams(temperature=1e-37, top_p=1.0)
    g = torch.Generator().manual_seed(0)
    assert not torch.isfinite((logits / p.temperature).softmax(-1)).all()  # what used to reach multinomial
    assert [sample(logits, NO_HISTORY, p, g) for _ in range(5)] == [1] * 5


def test_poison_temperature_generates_the_greedy_text(tiny_model):
    prompt = DEFAULT_PROMPT
    greedy = "".join(tiny_model.generate(prompt, max_new_tokens=40, temperature=0, seed=1))
    poison = "".join(tiny_model.generate(prompt, max_new_tokens=40, temperature=POISON_TEMPERATURE, seed=1))
    assert poison == greedy and greedy


# ------------------------------------------------------------------------- 2. prompt length
@pytest.fixture(scope="module", params=["chatglm2", "chatglm"])
def real_tokenizer(request):
    if request.param == "chatglm2":
        return ChatGLM2Tokenizer(REF / "chatglm2" / "tokenizer.model")
    return ChatGLMTokenizer(REF / "chatglm" / "ice_text.model")


def test_longest_piece_of_the_real_vocabularies(real_tokenizer):
    # chatglm2: '▁' * 16; chatglm-6b: '▁characteristics' (16 characters)
    assert real_tokenizer.piece_chars == 16


# Pieces of text that tokenize densest or that normalization shrinks, mixed with any characters.
HOSTILE_TEXT = st.lists(
    st.sampled_from([" ", "  " * 40, "\n", "\t", "\u3000", "▁" * 16, "e\u0301", "ｃ", "\x00", "[MASK]", "<n>",
                     "习近平新时代中国特色社会主义思想", "▁characteristics", "<|blank_80|>"])
    | st.text(max_size=8),
    max_size=60,
).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=HOSTILE_TEXT)
def test_min_tokens_never_exceeds_the_real_count(real_tokenizer, text):
    assert real_tokenizer.min_tokens(text) <= len(real_tokenizer.encode(text))


def test_prompt_that_cannot_fit_is_refused_before_tokenizing(tiny_model, monkeypatch):
    ctx = tiny_model.config.max_context
    prompt = "x" * (tiny_model.tokenizer.piece_chars * ctx)

    def no_encode(text):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(tiny_model.tokenizer, "encode", no_encode)
    with pytest.raises(glm.InputError, match=rf"prompt is too long: {len(prompt)} characters .* context is {ctx}"):
        tiny_model.generate(prompt, max_new_tokens=4, fit_context=True)


def test_prompt_just_inside_the_bound_is_still_tokenized(tiny_model):
    """The bound refuses only what cannot fit: below it, the real count decides (and here fits)."""
    ctx = tiny_model.config.max_context
    prompt = "你好" * (ctx // 8)
    stream = tiny_model.generate(prompt, max_new_tokens=1, temperature=0, fit_context=True)
    list(stream)
    assert stream.prompt_tokens < ctx


# ------------------------------------------------------------------------- 3. stop strings
def test_too_many_stop_strings_are_refused():
    stops = tuple(f"s{i}" for i in range(MAX_STOP_STRINGS + 1))
    with pytest.raises(glm.InputError, match=f"too many stop strings: {MAX_STOP_STRINGS + 1}, at most {MAX_STOP_STRINGS}"):
        SamplingParams(stop=stops).validate()
    assert SamplingParams(stop=stops[:-1]).validate().stop == stops[:-1]


def test_too_long_stop_string_is_refused():
    with pytest.raises(glm.InputError, match=f"stop string too long: {MAX_STOP_CHARS + 1} characters"):
        SamplingParams(stop=("a" * (MAX_STOP_CHARS + 1),)).validate()


def _first_stop_cut(text: str, stops) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="ab你😀", min_size=1, max_size=6), min_size=1, max_size=MAX_STOP_STRINGS),
    chunks=st.lists(st.text(alphabet="ab你😀c", max_size=5), max_size=30),
)
def test_stop_matcher_cuts_at_the_first_stop_whatever_the_chunks(stops, chunks):
    m = StopMatcher(tuple(stops))
    out, hit = [], False
    for c in chunks:
        text, hit = m.feed(c)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    assert ("".join(out), hit) == _first_stop_cut("".join(chunks), stops)


def test_stop_matching_time_is_bounded():
    """The most a request may send (32 stops of 128 characters that almost match everything):
    well under a millisecond per token, where 100,000 stops took the engine thread ~30x longer."""
    stops = tuple("ab" * 63 + chr(0x4E00 + i) + "z" for i in range(MAX_STOP_STRINGS))
    m = StopMatcher(SamplingParams(stop=stops).validate().stop)
    t0 = time.perf_counter()
    n = 2000
    for _ in range(n // 2):
        m.feed("a")
        m.feed("b")
    per_token = (time.perf_counter() - t0) / n
    assert per_token < 1e-3, per_token


# ------------------------------------------------------------------------- 6. checkpoints
def _with_config(src: Path, dest: Path, **changes) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize("changes, message", [
    (dict(num_layers=100000), r"num_layers = 100000 is outside the sane range \[1, 256\]"),
    (dict(num_layers=-3), r"num_layers = -3 is outside"),
    (dict(hidden_size=10**9), r"hidden_size = 1000000000 is outside"),
    (dict(padded_vocab_size=2**40), r"vocab_size = 1099511627776 is outside"),
    (dict(num_attention_heads=0), r"num_heads = 0 is outside|bad value"),
    (dict(rope_ratio=float("nan")), r"rope_ratio = nan is outside"),
    (dict(rope_ratio=1e300), r"rope_ratio = 1e\+300 is outside"),
    (dict(seq_length=2**40), r"seq_length = 1099511627776 is outside"),
    (dict(hidden_size=16384, ffn_hidden_size=262144, num_layers=256), r"parameters, more than"),
])
def test_absurd_config_is_refused_before_any_allocation(tiny_dir, tmp_path, changes, message):
    ckpt = _with_config(tiny_dir, tmp_path / "ckpt", **changes)
    t0 = time.perf_counter()
    with pytest.raises(glm.CheckpointError, match=message):
        glm.load(ckpt)
    assert time.perf_counter() - t0 < 5


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_names_the_refused_global(tiny_dir, tmp_path):
    ckpt = tmp_path / "evil"
    shutil.copytree(tiny_dir, ckpt, ignore=shutil.ignore_patterns("*.bin", "*.safetensors", "*.index.json"))
    marker = tmp_path / "pwned"
    torch.save({"transformer.embedding.word_embeddings.weight": _RunsCode(str(marker))}, ckpt / "pytorch_model.bin")
    with pytest.raises(glm.CheckpointError) as err:
        glm.load(ckpt)
    msg = str(err.value)
    assert "posix.system" in msg and "refused" in msg, msg
    assert "weights_only=False" not in msg and "Re-running" not in msg, msg
    assert not marker.exists()


# ------------------------------------------------------------------------- through the real server
@pytest.fixture(scope="module")
def hostile_server(app_dir):
    with CogServer(app_dir, env={"COG_MAX_CONCURRENCY": str(CONCURRENCY)}) as srv:
        srv.wait_for({"READY"}, timeout=300)
        yield srv


def _post(server, inp, **kw):
    return server.predict({"input": inp}, wait_ready=False, **kw)


def test_poison_temperature_does_not_fail_its_batch(hostile_server, reference_model, long_seed):
    normal = {"max_tokens": 200, "temperature": 1.0, "top_p": 1.0, "seed": long_seed}
    poison = {"max_tokens": 200, "temperature": POISON_TEMPERATURE}
    assert_ready(hostile_server)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_post, hostile_server, inp) for inp in (normal, poison, normal, poison)]
        bodies = [f.result().json() for f in futures]
    want_normal = reference(reference_model, **normal)[0]
    want_poison = reference(reference_model, max_tokens=200, temperature=0.0)[0]
    for body, want in zip(bodies, (want_normal, want_poison) * 2):
        assert body["status"] == "succeeded", {k: body.get(k) for k in ("status", "error")}
        assert "".join(body["output"]) == want
    assert max(int(re.search(r"peak_batch=(\d+)", b["logs"])[1]) for b in bodies) >= 2  # they shared steps


def test_whole_number_floats_are_integers(hostile_server, reference_model):
    body = _post(hostile_server, {"max_tokens": 16.0, "top_k": 5.0, "seed": 7.0, "temperature": 1.0}).json()
    assert body["status"] == "succeeded", body.get("error")
    assert "".join(body["output"]) == reference(reference_model, max_tokens=16, top_k=5, seed=7, temperature=1.0)[0]


def test_failed_prediction_names_its_seed(hostile_server, reference_model):
    too_long = DEFAULT_PROMPT + "你好" * reference_model.config.max_context
    body = _post(hostile_server, {"prompt": too_long, "seed": 4242}).json()
    assert body["status"] == "failed" and "prompt is too long" in body["error"], body.get("error")
    assert "seed 4242" in body["error"], body["error"]
    body = _post(hostile_server, {"prompt": too_long}).json()
    assert re.search(r"pass seed=\d+ to reproduce", body["error"]), body["error"]


def test_many_stop_strings_fail_their_request_only(hostile_server):
    stops = ",".join(f"stop{i}" for i in range(1000))  # under the schema's length cap, over the count
    body = _post(hostile_server, {"stop_sequences": stops, "max_tokens": 8}).json()
    assert body["status"] == "failed", body.get("status")
    assert f"too many stop strings: 1000, at most {MAX_STOP_STRINGS}" in body["error"]


def test_huge_prompt_is_refused_without_amplifying_memory(hostile_server):
    import predict

    size = predict.MAX_PROMPT_CHARS  # the longest the schema lets through; tokenizing took ~60 bytes per character
    before = worker_rss_mb(hostile_server)[0]
    t0 = time.monotonic()
    body = _post(hostile_server, {"prompt": "a" * size, "max_tokens": 4}, timeout=120).json()
    elapsed = time.monotonic() - t0
    grew = worker_rss_mb(hostile_server)[0] - before
    assert body["status"] == "failed" and "prompt is too long" in body["error"], body.get("error")
    assert grew < 6 * size / 2**20, f"worker RSS grew {grew:.0f} MB for a {size >> 20} MiB prompt"
    print(f"huge prompt: {size >> 20} MiB refused in {elapsed:.1f}s, worker RSS {before:.0f} -> +{grew:.0f} MB")
    # One character more is the schema's to refuse (tests/service/test_service_isolation.py: 50 MiB).
    r = hostile_server.predict({"input": {"prompt": "a" * (size + 1)}}, wait_ready=False, timeout=60)
    assert r.status_code == 422, r.status_code


# A barrage of bounded size: every answer is a 422 (schema) or a 200 whose prediction succeeded or
# failed with an error message; never a 5xx, never a hang; the server is READY after each one.
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
IN_BOUNDS = st.fixed_dictionaries({}, optional={
    "prompt": st.text(min_size=1, max_size=200),
    "max_tokens": st.integers(1, 24) | st.integers(1, 24).map(float),
    "temperature": st.floats(0, 5),
    "top_p": st.floats(0, 1),
    "top_k": st.integers(0, 1000),
    "repetition_penalty": st.floats(1, 2),
    "stop_sequences": st.text(max_size=60),
    "seed": st.integers(0, 2**32 - 1),
    "cache_key": st.text(max_size=40),
})
ANY_INPUT = st.dictionaries(
    st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                     "stop_sequences", "seed", "cache_key", "\x00", "é" * 40]),
    JSONISH, max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(inp=IN_BOUNDS | ANY_INPUT)
def test_hostile_inputs_never_break_the_server(hostile_server, inp):
    inp = {**inp, "max_tokens": inp["max_tokens"]} if isinstance(inp.get("max_tokens"), (int, float)) else inp
    r = hostile_server.predict({"input": inp}, wait_ready=False, timeout=60)
    assert r.status_code in (200, 422), (r.status_code, r.text[:500])
    if r.status_code == 200:
        body = r.json()
        assert body["status"] in ("succeeded", "failed"), body
        if body["status"] == "failed":
            assert body["error"] and "Traceback" not in body["error"], body["error"]
    assert hostile_server.health()["status"] in ("READY", "BUSY")


@pytest.mark.parametrize("data, headers", [
    (b"{", {"Content-Type": "application/json"}),
    (b"\xff\xfe\x00garbage", {"Content-Type": "application/json"}),
    (b'{"input": "not an object"}', {"Content-Type": "application/json"}),
    (b'{"input": {"prompt": "\\ud800"}}', {"Content-Type": "application/json"}),  # lone surrogate
    (b'{"input": {}}', {"Content-Type": "text/plain"}),
    (b'[' * 100_000 + b']' * 100_000, {"Content-Type": "application/json"}),
    (b'{"input": {"prompt": "' + b"x" * (8 << 20) + b'"}}', {"Content-Type": "application/json"}),
])
def test_malformed_bodies_are_client_errors(hostile_server, data, headers):
    r = requests.post(hostile_server.url + "/predictions", data=data, headers=headers, timeout=120)
    assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:300])
    if r.status_code == 200:
        assert r.json()["status"] in ("succeeded", "failed")
    assert_ready(hostile_server)


# ------------------------------------------------------------------------- coglet 0.23.1 findings
# Each test asserts what a safe server does; coglet 0.23.1 does not, so they are strict xfails: an
# upgrade that fixes one turns it into an unexpected pass, and the docs/SERVICE.md entry can go.
PREDICTIONS_DIR = Path("/tmp/coglet/predictions")
UPSTREAM = "coglet 0.23.1 (docs/SERVICE.md, Security)"


class UpstreamDefect(Exception):
    """The finding itself: only this counts as the expected failure (a server that does not start does not)."""


def upstream_defect(found: bool, what: str) -> None:
    if found:
        raise UpstreamDefect(what)


def known_upstream(reason: str):
    return pytest.mark.xfail(strict=True, raises=UpstreamDefect, reason=f"{UPSTREAM}: {reason}")


@pytest.fixture()
def victim(app_dir):
    """A server of its own for tests that damage it (leaked slots, shutdown)."""
    with CogServer(app_dir, env={"COG_MAX_CONCURRENCY": "2"}) as srv:
        srv.wait_for({"READY"}, timeout=300)
        yield srv


@known_upstream("a prediction's directory is never removed")
def test_upstream_prediction_directory_is_removed(hostile_server):
    pid = f"i17-dir-{uuid.uuid4().hex}"
    body = hostile_server.predict({"id": pid, "input": {"max_tokens": 2}}, wait_ready=False).json()
    assert body["status"] == "succeeded"
    time.sleep(1)
    upstream_defect((PREDICTIONS_DIR / pid).exists(), f"{PREDICTIONS_DIR / pid} is left behind")


@known_upstream("a client-chosen id is used as a path")
def test_upstream_id_is_not_a_path(hostile_server):
    name = f"i17-escape-{uuid.uuid4().hex}"
    outside = PREDICTIONS_DIR.parent.parent / name  # /tmp/<name>
    try:
        hostile_server.predict({"id": f"../../{name}", "input": {"max_tokens": 2}}, wait_ready=False)
        upstream_defect(outside.exists(), f"id '../../{name}' created {outside}")
    finally:
        shutil.rmtree(outside, ignore_errors=True)


@known_upstream("no read timeout for a request's headers")
def test_upstream_idle_half_request_is_closed(hostile_server):
    with socket.create_connection(("127.0.0.1", hostile_server.port), timeout=20) as s:
        s.sendall(b"POST /predictions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        s.settimeout(15)
        try:
            closed = s.recv(1) == b""
        except socket.timeout:
            closed = False
    upstream_defect(not closed, "the server still holds a half-sent request's connection after 15 s")


@known_upstream("ids over 255 bytes or with NUL leak a slot for good")
def test_upstream_bad_ids_do_not_leak_slots(victim):
    for bad in ("x" * 300, "nul\x00id"):
        victim.predict({"id": bad, "input": {"max_tokens": 2}}, wait_ready=False, retry_409=False)
    time.sleep(2)
    r = victim.predict({"input": {"max_tokens": 2}}, wait_ready=False, retry_409=False)
    upstream_defect(r.status_code == 409, f"both slots leaked: 409, health {victim.health()['status']}")
    assert r.status_code == 200, (r.status_code, r.text[:200])


@known_upstream("POST /shutdown needs no credentials")
def test_upstream_shutdown_needs_credentials(victim):
    requests.post(victim.url + "/shutdown", timeout=10)
    try:
        victim.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    upstream_defect(victim.proc.poll() is not None, "an anonymous POST /shutdown stopped the server")


# ------------------------------------------------------------------------- 6. shutdown
def test_sigterm_drains_within_its_deadline(app_dir):
    """coglet waits on SIGTERM for every running prediction; predict.py cancels what is still
    running GLM_DRAIN_SECONDS after the server stopped accepting connections."""
    drain = 2
    with CogServer(app_dir, env={"COG_MAX_CONCURRENCY": "2", "GLM_DRAIN_SECONDS": str(drain)}) as srv:
        srv.wait_for({"READY"}, timeout=300)
        with ThreadPoolExecutor(1) as pool:
            # seed 3 samples all 8000 tokens on the tiny checkpoint: tens of seconds
            future = pool.submit(_post, srv, {"max_tokens": 8000, "temperature": 1.0, "top_p": 1.0, "seed": 3},
                                 timeout=300)
            deadline = time.monotonic() + 60
            while srv.log_count("[chatglm] seed 3") == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            t0 = time.monotonic()
            os.kill(srv.proc.pid, signal.SIGTERM)  # the server only, as `docker stop` does
            body = future.result().json()
            srv.proc.wait(timeout=60)
            took = time.monotonic() - t0
    assert body["status"] == "canceled", {k: body.get(k) for k in ("status", "error")}
    assert "running prediction(s) get 2s to end" in srv.logs(200_000)
    assert took < drain + 15, took
