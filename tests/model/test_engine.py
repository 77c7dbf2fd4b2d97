"""The engine's loop under faults, slow steps and cancels, on the tiny checkpoint.

`SlowModel` is a test double around the real model: it can make forward passes slow (to measure what
waits for a step) and fail on demand (to check that a failure stays with the requests it touches).
"""
from __future__ import annotations

import os
import threading
import time

import pytest

import glm
from glm.engine import Engine
from glm.sampling import SamplingParams
from glm.llm import Stream

PROMPT = "[Round 1]\n\n问：你好\n\n答："


class SlowModel:
    """The tiny model, with a delay per forward pass (prefill / decode) and an optional fault."""

    def __init__(self, model, prefill_s: float = 0.0, decode_s: float = 0.0):
        self.model, self.prefill_s, self.decode_s = model, prefill_s, decode_s
        self.fail_if = None            # fail_if(tokens, positions, caches) -> True: raise instead
        self.in_prefill = threading.Event()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, positions, caches, **kw):
        if self.fail_if is not None and self.fail_if(tokens, positions, caches):
            raise RuntimeError("injected forward-pass fault")
        if tokens.shape[1] > 1:
            self.in_prefill.set()
            time.sleep(self.prefill_s)
            self.in_prefill.clear()
        else:
            time.sleep(self.decode_s)
        return self.model(tokens, positions, caches, **kw)


def make_engine(tiny_model, model=None, **kw) -> Engine:
    return Engine(model or tiny_model.model, tiny_model.tokenizer, tiny_model.config, tiny_model.device, **kw)


def submit(tiny_model, engine, prompt=PROMPT, **kw) -> Stream:
    kw.setdefault("max_new_tokens", 8)
    kw.setdefault("seed", 0)
    kw.setdefault("temperature", 1.0)
    return Stream(engine, engine.submit(tiny_model.tokenizer.encode(prompt), SamplingParams(**kw)))


def solo(tiny_model, **kw) -> list[int]:
    engine = make_engine(tiny_model)
    engine.start()
    s = submit(tiny_model, engine, **kw)
    list(s)
    engine.stop()
    return s.token_ids


def drain(stream: Stream, timeout: float = 30) -> tuple[str, BaseException | None]:
    """The stream's text and the error it ended with (None if it ended normally), within `timeout`."""
    out: dict = {}

    def read():
        try:
            out["text"] = "".join(stream)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"stream did not end within {timeout}s"
    return out.get("text", ""), out.get("error")


@pytest.fixture
def threaded(tiny_model):
    engines = []

    def start(model=None, **kw):
        e = make_engine(tiny_model, model, **kw)
        e.start()
        engines.append(e)
        return e

    yield start
    for e in engines:
        e.stop()


# ---- nothing waits for a step ----

def test_submit_and_cancel_during_a_long_prefill_do_not_wait_for_it(tiny_model, threaded):
    slow = SlowModel(tiny_model.model, prefill_s=1.5)
    engine = threaded(slow)
    first = submit(tiny_model, engine)
    assert slow.in_prefill.wait(10)
    t = time.perf_counter()
    second = submit(tiny_model, engine, seed=1)
    submit_s = time.perf_counter() - t
    t = time.perf_counter()
    second.cancel()
    cancel_s = time.perf_counter() - t
    assert slow.in_prefill.is_set(), "the prefill ended before the measurement did"
    print(f"submit during a 1.5 s prefill: {submit_s * 1e3:.2f} ms, cancel: {cancel_s * 1e3:.2f} ms")
    assert submit_s < 0.1 and cancel_s < 0.1
    assert second.finish_reason == "canceled"
    assert drain(first)[1] is None and first.finish_reason == "length"


def test_cancel_before_the_first_token_ends_the_stream_and_frees_the_sequence(tiny_model, threaded):
    slow = SlowModel(tiny_model.model, prefill_s=1.0)
    engine = threaded(slow)
    stream = submit(tiny_model, engine, max_new_tokens=50)
    assert slow.in_prefill.wait(10)
    t = time.perf_counter()
    stream.cancel()
    text, error = drain(stream, timeout=5)
    ended_s = time.perf_counter() - t
    assert (text, error, stream.finish_reason, stream.new_tokens) == ("", None, "canceled", 0)
    assert ended_s < 0.5, ended_s  # ended before the prefill step it was in
    deadline = time.monotonic() + 5
    while engine.pending or engine.reserved_tokens:
        assert time.monotonic() < deadline, (engine.pending, engine.reserved_tokens)
        time.sleep(0.01)
    assert stream.seq.cache is None and stream.seq.extent is None
    later = submit(tiny_model, engine, seed=3)
    assert drain(later)[1] is None and later.token_ids == solo(tiny_model, seed=3)


def test_completion_is_not_delayed_by_a_step(tiny_model, threaded):
    slow = SlowModel(tiny_model.model, decode_s=0.4)
    engine = threaded(slow)
    long = submit(tiny_model, engine, max_new_tokens=30, seed=1)
    short = submit(tiny_model, engine, max_new_tokens=3, seed=2)
    assert drain(short)[1] is None
    ended = time.perf_counter()
    t = time.perf_counter()
    short.cancel()  # what predict.py's _stream does after every prediction
    cancel_s = time.perf_counter() - t
    lag = ended - short.seq.t_done
    print(f"reader saw the end {lag * 1e3:.2f} ms after the last token; cancel after the end {cancel_s * 1e3:.3f} ms")
    assert short.finish_reason == "length" and lag < 0.2 and cancel_s < 0.05
    assert long.finish_reason is None  # still running beside it
    long.cancel()


# ---- faults stay with the requests they touch ----

def _fault_run(tiny_model, engine, bad_seed: int):
    seeds = [1, bad_seed, 2]
    streams = [submit(tiny_model, engine, seed=s, max_new_tokens=12) for s in seeds]
    t = time.perf_counter()
    results = [drain(s) for s in streams]
    return streams, results, time.perf_counter() - t


def _assert_only_bad_failed(tiny_model, engine, streams, results, match: str):
    good = [(s, r) for s, r in zip(streams, results) if s.seed != 666]
    bad = [(s, r) for s, r in zip(streams, results) if s.seed == 666]
    for s, (text, error) in good:
        assert error is None and s.token_ids == solo(tiny_model, seed=s.seed, max_new_tokens=12)
    (s, (_, error)), = bad
    assert s.finish_reason == "error" and match in str(error), error
    later = submit(tiny_model, engine, seed=5, max_new_tokens=6)
    assert drain(later)[1] is None and later.token_ids == solo(tiny_model, seed=5, max_new_tokens=6)
    assert engine.healthy and engine.reserved_tokens == 0


def test_a_fault_in_admission_fails_only_that_request(tiny_model, threaded, monkeypatch):
    engine = threaded()
    place = engine.scheduler.place

    def faulty_place(seq):
        if seq.params.seed == 666:
            raise MemoryError("injected admission fault")
        return place(seq)

    monkeypatch.setattr(engine.scheduler, "place", faulty_place)
    streams, results, _ = _fault_run(tiny_model, engine, 666)
    bad_error = results[1][1]
    assert isinstance(bad_error, MemoryError)
    _assert_only_bad_failed(tiny_model, engine, streams, results, "injected admission fault")


def test_a_fault_in_reaping_leaves_the_others_and_later_requests_working(tiny_model, threaded, monkeypatch):
    engine = threaded()
    release = engine.scheduler.release
    faults = []

    def faulty_release(seq):
        if seq.params.seed == 666:
            faults.append(seq)
            raise RuntimeError("injected reaping fault")
        release(seq)

    monkeypatch.setattr(engine.scheduler, "release", faulty_release)
    seeds = [1, 666, 2]
    streams = [submit(tiny_model, engine, seed=s, max_new_tokens=12) for s in seeds]
    # The request being reaped had already ended: it keeps its result; the loop goes on.
    for s in streams:
        assert drain(s)[1] is None and s.token_ids == solo(tiny_model, seed=s.seed, max_new_tokens=12)
    deadline = time.monotonic() + 2
    while not faults:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    later = submit(tiny_model, engine, seed=5, max_new_tokens=6)
    assert drain(later)[1] is None and later.token_ids == solo(tiny_model, seed=5, max_new_tokens=6)
    assert engine.healthy and not engine.active


def test_a_fault_in_one_sequences_sampling_fails_only_that_sequence(tiny_model, threaded, monkeypatch):
    from glm import runner

    real = runner.sample_rows

    def faulty_sample_rows(logits, seen, rows, generators):
        # a batch holding the bad sequence's row fails; the runner then samples each row alone
        if any(g is not None and g.initial_seed() == 666 for g in generators):
            raise FloatingPointError("injected sampling fault")
        return real(logits, seen, rows, generators)

    monkeypatch.setattr(runner, "sample_rows", faulty_sample_rows)
    engine = threaded()
    streams, results, took = _fault_run(tiny_model, engine, 666)
    assert took < 10
    _assert_only_bad_failed(tiny_model, engine, streams, results, "injected sampling fault")


def test_a_forward_pass_failing_for_one_sequence_fails_only_that_one(tiny_model, threaded):
    slow = SlowModel(tiny_model.model)
    engine = threaded(slow)
    bad = {}
    # Fails whenever the bad sequence's cache is in the pass (batched or alone) after its first token.
    slow.fail_if = lambda tokens, positions, caches: bad.get("seq") is not None and bad["seq"].new_tokens >= 2 \
        and any(c is bad["seq"].cache for c in caches)
    streams = [submit(tiny_model, engine, seed=s, max_new_tokens=12) for s in (1, 666, 2)]
    bad["seq"] = streams[1].seq
    results = [drain(s) for s in streams]
    _assert_only_bad_failed(tiny_model, engine, streams, results, "injected forward-pass fault")
    assert streams[1].new_tokens >= 2


def test_a_failing_wake_up_callback_hurts_no_one(tiny_model):
    engine = make_engine(tiny_model)
    a = submit(tiny_model, engine, seed=1)
    b = submit(tiny_model, engine, seed=2)

    def boom():
        raise RuntimeError("injected wake-up fault")

    a.seq.on_output(boom)
    while engine.step():
        pass
    assert a.token_ids == solo(tiny_model, seed=1) and b.token_ids == solo(tiny_model, seed=2)
    assert "".join(a) == tiny_model.tokenizer.decode(a.token_ids)


def test_a_dead_loop_fails_every_request_at_once_and_reports_unhealthy(tiny_model, threaded, monkeypatch):
    slow = SlowModel(tiny_model.model, decode_s=0.05)
    engine = threaded(slow)
    running = submit(tiny_model, engine, max_new_tokens=200)
    assert running.seq.read(timeout=10)  # it runs
    monkeypatch.setattr(engine.scheduler, "schedule", lambda: 1 / 0)
    queued = submit(tiny_model, engine, seed=1)
    t = time.perf_counter()
    results = [drain(running, timeout=5), drain(queued, timeout=5)]
    took = time.perf_counter() - t
    for _, error in results:
        assert isinstance(error, glm.EngineError) and "ZeroDivisionError" in str(error), error
    assert took < 1.0, took
    assert not engine.healthy and engine.pending == 0
    with pytest.raises(glm.EngineError, match="stopped"):
        submit(tiny_model, engine)


def test_a_stream_never_waits_forever_on_a_dead_engine(tiny_model, threaded, monkeypatch):
    engine = threaded()
    stream = submit(tiny_model, engine, max_new_tokens=400)
    # The loop dies without reaching this sequence (it is no longer in the scheduler).
    with engine._lock:
        engine.scheduler.running.clear()
        engine.scheduler.waiting.clear()
    engine.dead = RuntimeError("gone")
    _, error = drain(stream, timeout=3)
    assert isinstance(error, glm.EngineError) and "gone" in str(error)


def test_a_hung_step_is_seen_by_the_watchdog_and_fails_every_request(tiny_model, threaded, caplog):
    """A step that never returns (here: the fault hook sleeps) marks the engine unhealthy within the
    bound (+ the watchdog's 0.25 s tick), fails the running and the queued requests with an error
    naming the bound, and logs the step's shape."""
    bound, hang = 1.0, 4.0
    engine = threaded(step_timeout_s=bound)
    released = threading.Event()
    engine.before_run = lambda batch: released.wait(hang)
    t0 = time.monotonic()
    running = submit(tiny_model, engine, max_new_tokens=50)
    queued = submit(tiny_model, engine, seed=1)
    while engine.healthy and time.monotonic() - t0 < hang:
        time.sleep(0.02)
    unhealthy_after = time.monotonic() - t0
    assert not engine.healthy and bound < unhealthy_after < bound + 1.0, unhealthy_after
    for stream in (running, queued):
        _, error = drain(stream, timeout=1)
        assert isinstance(error, glm.EngineError), error
        assert f"longer than the {bound:g}s bound (GLM_STEP_TIMEOUT_SECONDS)" in str(error), error
    shape = next(r.getMessage() for r in caplog.records if "GLM_STEP_TIMEOUT_SECONDS" in r.getMessage())
    prompt_tokens = len(tiny_model.tokenizer.encode(PROMPT))
    assert f"{prompt_tokens} rows: {prompt_tokens} prefill tokens, 0 decode, batch 1" in shape, shape
    with pytest.raises(glm.EngineError, match="GLM_STEP_TIMEOUT_SECONDS"):
        submit(tiny_model, engine)
    released.set()  # the stuck step returns; the loop does not go on


def test_steps_within_the_bound_keep_the_engine_healthy(tiny_model, threaded):
    slow = SlowModel(tiny_model.model, decode_s=0.05)
    engine = threaded(slow, step_timeout_s=0.5)
    s = submit(tiny_model, engine, max_new_tokens=20)
    assert drain(s)[1] is None and engine.healthy


def test_a_request_waiting_for_kv_memory_past_the_bound_fails_naming_the_wait(tiny_model, threaded):
    slow = SlowModel(tiny_model.model, decode_s=0.05)
    n = len(tiny_model.tokenizer.encode(PROMPT))
    engine = threaded(slow, kv_budget_tokens=n + 100, kv_wait_s=0.5, max_batch=4)
    big = submit(tiny_model, engine, max_new_tokens=100, seed=3)   # holds the whole budget for ~5 s
    assert big.seq.read(timeout=10)
    t0 = time.monotonic()
    waiting = submit(tiny_model, engine, max_new_tokens=8)
    _, error = drain(waiting, timeout=5)
    waited = time.monotonic() - t0
    assert isinstance(error, glm.errors.QueueTimeout), error
    assert "for KV cache memory, longer than the 0.5s bound (GLM_KV_WAIT_SECONDS)" in str(error), error
    assert f"needs {n + 8} tokens" in str(error) and 0.5 < waited < 2.0, (str(error), waited)
    assert drain(big)[1] is None and engine.healthy  # the others go on


def test_watchdog_and_wait_bounds_from_the_environment(tiny_model, monkeypatch):
    monkeypatch.setenv("GLM_STEP_TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("GLM_KV_WAIT_SECONDS", "7")
    engine = make_engine(tiny_model, config=glm.EngineConfig.from_env())
    assert engine.step_timeout_s == 2.5 and engine.scheduler.max_wait_s == 7
    for name, bad in (("GLM_STEP_TIMEOUT_SECONDS", "inf"), ("GLM_STEP_TIMEOUT_SECONDS", "0"),
                      ("GLM_KV_WAIT_SECONDS", "nan"), ("GLM_KV_WAIT_SECONDS", "-1")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(glm.GLMError, match=f"{name}='{bad}' must be a finite number > 0"):
            glm.EngineConfig.from_env()
        monkeypatch.delenv(name)


def test_a_stopped_engine_starts_again(tiny_model):
    engine = make_engine(tiny_model)
    for _ in range(2):
        engine.start()
        s = submit(tiny_model, engine, seed=4)
        assert drain(s)[1] is None and s.token_ids == solo(tiny_model, seed=4)
        engine.stop()
        assert not engine.threaded and engine.healthy


def test_one_loop_mode_the_thread_started_once_by_the_first_requests(tiny_model):
    """GLM.generate starts the engine's loop; concurrent first requests start one thread, and the
    loop's steps are its own (another thread's step() is refused while it runs)."""
    import concurrent.futures

    engine = tiny_model.use_engine(max_batch=4)
    before = {t for t in threading.enumerate() if t.name == "glm-engine"}
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = list(pool.map(lambda i: tiny_model.generate(PROMPT, max_new_tokens=6, seed=i), range(4)))
        assert engine.threaded
        assert len({t for t in threading.enumerate() if t.name == "glm-engine"} - before) == 1
        with pytest.raises(glm.EngineError, match="step\\(\\) is the engine thread's"):
            engine.step()
        assert ["".join(s) for s in streams] and all(s.new_tokens == 6 or s.finish_reason == "eos" for s in streams)
    finally:
        tiny_model.use_engine()
    assert not engine.threaded  # replaced: its loop stopped


def test_a_stream_whose_engine_loop_is_not_running_says_so(tiny_model):
    engine = make_engine(tiny_model)
    text, error = drain(submit(tiny_model, engine), timeout=3)
    assert text == "" and isinstance(error, glm.EngineError) and "loop is not running" in str(error), error


def test_a_dropped_model_stops_its_loop(tiny_dir):
    import gc

    m = glm.load(tiny_dir)
    assert "".join(m.generate(PROMPT, max_new_tokens=3, seed=0))
    engine = m.engine
    assert engine.threaded
    del m
    gc.collect()
    assert not engine.threaded


def test_drain_lets_requests_end_within_its_time_then_cancels_the_rest(tiny_model, threaded):
    slow = SlowModel(tiny_model.model, decode_s=0.02)
    engine = threaded(slow, max_batch=4)
    short = submit(tiny_model, engine, max_new_tokens=5, seed=1)
    long = submit(tiny_model, engine, max_new_tokens=400, seed=2)
    t0 = time.monotonic()
    assert engine.drain(1.0) == 1
    assert 1.0 <= time.monotonic() - t0 < 2.0
    assert drain(short)[1] is None and short.finish_reason in ("length", "eos")
    assert drain(long)[1] is None and long.finish_reason == "canceled" and long.new_tokens < 400


# ---- admission ----

def test_a_large_request_neither_blocks_small_ones_nor_starves(tiny_model):
    ids = tiny_model.tokenizer.encode(PROMPT)
    n = len(ids)
    engine = make_engine(tiny_model, kv_budget_tokens=3 * (n + 10), max_batch=8)
    engine.scheduler.max_overtakes = 2
    params = lambda new, seed: SamplingParams(max_new_tokens=new, seed=seed, temperature=1.0, top_p=1.0)  # noqa: E731
    first = engine.submit(ids, params(10, 0))      # takes a third of the budget
    big = engine.submit(ids, params(n + 21, 1))     # 2n + 21 tokens: one more than what is left
    small = [engine.submit(ids, params(10, 2 + i)) for i in range(4)]
    engine.step()
    # big does not fit beside first; the first two small ones pass it, then it has waited long enough.
    assert engine.active == [first, small[0], small[1]]
    assert list(engine.waiting) == [big, small[2], small[3]] and big.overtaken == 2
    while big not in engine.active:
        assert small[2] in engine.waiting  # nothing passes big once it has been overtaken twice
        assert engine.step()
    while engine.step():
        pass
    assert all(s.finish_reason in ("length", "eos") for s in [first, big, *small])
    assert engine.reserved_tokens == 0


# ---- output stage hooks and statistics ----

class FilteringTokenizer:
    """The tiny tokenizer with its stop ids and response filter (what it declares to the output stage) replaced."""

    def __init__(self, tok, stop_ids):
        self.tok, self.stop_ids = tok, frozenset(stop_ids)

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def response_filter(self):
        class Upper:
            def push(self, text):
                return text.upper()

            def flush(self):
                return "<END>"
        return Upper()


def test_output_stage_applies_stop_ids_and_the_response_filter_before_stop_strings(tiny_model, threaded):
    ids = tiny_model.tokenizer.encode(PROMPT)
    params = SamplingParams(max_new_tokens=40, seed=7, temperature=1.0, top_p=1.0)
    plain = threaded()
    ref = Stream(plain, plain.submit(ids, params))
    text = "".join(ref)
    gen = ref.token_ids
    k = next(i for i in range(3, len(gen)) if gen[i] not in gen[:i])
    engine = Engine(tiny_model.model, FilteringTokenizer(tiny_model.tokenizer, {gen[k]}), tiny_model.config,
                    tiny_model.device)
    seq = engine.submit(ids, params)
    while engine.step():
        pass
    s = Stream(engine, seq)
    out = "".join(s)
    assert s.finish_reason == "eos" and s.token_ids == gen[:k]  # gen[k] is a stop id now
    assert out == tiny_model.tokenizer.decode(gen[:k]).upper() + "<END>"
    # Stop strings are matched in the filtered text: this one exists only upper-cased.
    upper = text.upper()
    cut = next(i for i in range(len(text)) if upper[i] != text[i])
    stop = upper[cut:cut + 2]
    assert stop not in text and stop not in upper[:cut]
    engine = Engine(tiny_model.model, FilteringTokenizer(tiny_model.tokenizer, set()), tiny_model.config,
                    tiny_model.device)
    seq = engine.submit(ids, SamplingParams(max_new_tokens=40, seed=7, temperature=1.0, top_p=1.0, stop=(stop,)))
    while engine.step():
        pass
    s = Stream(engine, seq)
    assert "".join(s) == upper[:cut] and s.finish_reason == "stop"


def test_stream_metrics_and_summary(tiny_model, threaded):
    engine = threaded()
    s = submit(tiny_model, engine, max_new_tokens=9, seed=11, temperature=1.0, top_p=1.0)
    list(s)
    m = s.metrics()
    assert m["input_token_count"] == len(tiny_model.tokenizer.encode(PROMPT))
    assert m["output_token_count"] == s.new_tokens == len(s.token_ids)
    assert 0 < m["time_to_first_token"] <= s.elapsed and m["tokens_per_second"] > 0
    line = s.summary()
    assert f"prompt_tokens={m['input_token_count']} new_tokens={s.new_tokens} " in line
    assert f"seed=11 finish_reason={s.finish_reason}" in line


def test_predictor_health_follows_the_engine(tiny_model, monkeypatch):
    """predict.Predictor.healthcheck is coglet's user health check: False (UNHEALTHY) once the loop died."""
    import predict

    p = predict.Predictor()
    p.model = tiny_model
    engine = tiny_model.use_engine(max_batch=2)
    engine.start()
    try:
        assert p.healthcheck() is True
        monkeypatch.setattr(engine.scheduler, "schedule", lambda: 1 / 0)
        s = submit(tiny_model, engine)
        assert isinstance(drain(s, timeout=5)[1], glm.EngineError)
        assert p.healthcheck() is False
    finally:
        tiny_model.use_engine()


def test_server_cancel_before_the_stream_exists_cancels_it_when_it_is_attached(tiny_model):
    import cog_compat

    engine = make_engine(tiny_model)
    link = cog_compat.CancelLink()
    link()  # the server cancels while the request is still being submitted
    stream = submit(tiny_model, engine, max_new_tokens=50)
    link.attach(stream)
    assert stream.finish_reason == "canceled" and not engine.waiting and not engine.active


def test_the_cpu_path_never_imports_the_gpu_package(tiny_dir):
    """Serving on the CPU loads, prefills, decodes and samples without importing glm.gpu (whose
    import brings triton in wherever TRITON_INTERPRET is set): a CPU worker keeps no GPU stack."""
    import subprocess
    import sys

    code = ("import sys, glm\n"
            f"m = glm.load({str(tiny_dir)!r}, device='cpu')\n"
            "text = ''.join(m.generate(m.chat_defaults['prompt'], max_new_tokens=4, temperature=0.8, seed=1))\n"
            "print(sorted(n for n in sys.modules if n.startswith(('glm.gpu', 'triton'))))\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_a_process_exits_cleanly_right_after_a_stream_ends(tiny_dir):
    """The engine thread may still be inside its last step's torch ops when the reader's stream ends;
    exiting then must wait for the step (an atexit stop), not abort in finalization ("terminate called
    without an active exception", 7 of 10 exits before the fix). Three exits: each aborted 70% of the time."""
    import subprocess
    import sys

    code = ("import glm\n"
            f"m = glm.load({str(tiny_dir)!r}, device='cpu')\n"
            "print(len(''.join(m.generate(m.chat_defaults['prompt'], max_new_tokens=4, temperature=0.8, seed=1))))\n")
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
