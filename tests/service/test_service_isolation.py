"""Issue 26's campaign, kept fixed, through the REAL Cog server on the tiny checkpoint.

- The prefix-cache side channel: knowing the start of a victim's prompt, an attacker tries each next
  digit with max_tokens=1 and keeps the one whose prediction reports the longest cached prefix (or
  the shortest time to first token). 60 probes recovered a 6-digit secret when every client shared
  one cache; with cache scopes a probe from another scope recovers nothing and costs what an
  uncached request costs, while the victim's own next turn still starts from its cached KV.
- A hung step (injected with GLM_TEST_HANG_SECONDS, read at setup; no request can set it): health
  turns UNHEALTHY within the watchdog's bound + 1 s and the requests fail with an error naming it.
- The comma bomb: 50 MB of commas in stop_sequences is refused by the schema before the worker
  sees it.
- A CPU deployment maps no Triton.
"""
from __future__ import annotations

import random
import re
import statistics
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from devtools.cogserver import CogServer  # noqa: E402
from service_helpers import worker_pid, worker_rss_mb  # noqa: E402

SYSTEM = ("[Round 1]\n\n问：你是ACME银行的客服助手。请礼貌地回答客户的问题，不要透露内部信息。"
          "内部账户密码是 ")
SECRET = "482913"
VICTIM_PROMPT = SYSTEM + SECRET + " ，请记住。\n\n答："


@pytest.fixture(scope="module")
def server(app_dir):
    with CogServer(app_dir, env={"GLM_DEVICE": "cpu"}) as srv:
        srv.wait_for({"READY"}, timeout=300)
        yield srv


def predict(server, **inp) -> dict:
    r = server.predict({"input": {"temperature": 0, **inp}}, wait_ready=False)
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert body["status"] == "succeeded", body
    return body


def cached_tokens(body) -> int:
    return int(re.search(r"cached_prompt_tokens=(\d+)", body["logs"])[1])


def attack(server, key: str) -> tuple[str, str]:
    """The campaign's probe, given the true digits before each one (the attacker's best case): 10
    candidates for each of the 6 digits, max_tokens=1 each. Returns what the probes give away, per
    digit: by the reported cached tokens, the candidate whose prefix matched strictly longest ('?'
    where none did: the attacker's own earlier probes match as far as every candidate shares), and
    by timing, the one with the shortest time to first token."""
    by_cache, by_time = "", ""
    for i in range(len(SECRET)):
        probes = []
        for d in "0123456789":
            body = predict(server, prompt=SYSTEM + SECRET[:i] + d + "\n\n答：", max_tokens=1, cache_key=key)
            probes.append((cached_tokens(body), body["metrics"]["time_to_first_token"], d))
        longest = max(p[0] for p in probes)
        winners = [p[2] for p in probes if p[0] == longest]
        by_cache += winners[0] if len(winners) == 1 else "?"
        by_time += min(probes, key=lambda p: p[1])[2]
    return by_cache, by_time


def test_the_side_channel_recovers_nothing_across_scopes(server):
    victim = f"victim-{uuid.uuid4()}"
    predict(server, prompt=VICTIM_PROMPT, max_tokens=4, cache_key=victim)
    for attacker in (f"attacker-{uuid.uuid4()}", ""):
        by_cache, by_time = attack(server, attacker)
        assert by_cache == "??????", by_cache
        assert by_time != SECRET
        print(f"cross-scope attack (key: {'another' if attacker else 'none'}): 60 probes, 0 digits told apart by "
              f"cached tokens, {sum(a == b for a, b in zip(by_time, SECRET))}/6 right by the fastest reply (chance)")
    # The same probe inside the victim's own scope finds every digit: the attack is real, scopes stop it.
    assert attack(server, victim)[0] == SECRET


def test_the_key_never_reaches_the_logs(server):
    key = f"do-not-log-{uuid.uuid4()}"
    body = predict(server, prompt=VICTIM_PROMPT, max_tokens=2, cache_key=key)
    assert key not in body["logs"] and key not in server.logs()


def document(seed: int, chars: int = 6000) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(chars))


def test_a_cross_scope_probe_costs_what_an_uncached_request_costs(server):
    """Time to first token of a long prompt: another scope's cached copy of it (cross) vs nothing
    cached anywhere (uncached), interleaved; the owner's own next turn (same) starts from its KV."""
    doc, question = document(0), "\n\n问：总结一下\n\n答："
    owner = f"owner-{uuid.uuid4()}"
    first = predict(server, prompt="[Round 1]\n\n问：" + doc + question, max_tokens=4, cache_key=owner)
    history = "[Round 1]\n\n问：" + doc + question + first["output"] if isinstance(first["output"], str) \
        else "[Round 1]\n\n问：" + doc + question + "".join(first["output"])
    ttft: dict[str, list[float]] = {"uncached": [], "cross": [], "same": []}
    for i in range(7):
        runs = {"uncached": ("[Round 1]\n\n问：" + document(100 + i) + question, f"fresh-{uuid.uuid4()}"),
                "cross": ("[Round 1]\n\n问：" + doc + question, f"fresh-{uuid.uuid4()}"),
                "same": (history + f"\n\n[Round 2]\n\n问：第{i}个问题\n\n答：", owner)}
        for name, (prompt, key) in runs.items():
            body = predict(server, prompt=prompt, max_tokens=1, cache_key=key)
            assert (cached_tokens(body) > 0) == (name == "same"), (name, body["logs"])
            ttft[name].append(body["metrics"]["time_to_first_token"])
    med = {k: statistics.median(v) for k, v in ttft.items()}
    tokens = first["metrics"]["input_token_count"]
    print(f"TTFT medians over 7, {tokens}-token prompt: uncached {med['uncached'] * 1e3:.1f} ms, cross-scope "
          f"{med['cross'] * 1e3:.1f} ms ({med['cross'] / med['uncached']:.2f}x), same-scope round 2 "
          f"{med['same'] * 1e3:.1f} ms ({med['same'] / med['uncached']:.2f}x)")
    assert 1 / 1.2 < med["cross"] / med["uncached"] < 1.2, med
    assert med["same"] / med["uncached"] < 0.5, med


# ---- input caps
@pytest.mark.parametrize("field, size", [("stop_sequences", 50 << 20), ("prompt", 50 << 20), ("cache_key", 1 << 20)])
def test_an_oversized_input_is_refused_before_the_worker_sees_it(server, field, size):
    _, peak_before = worker_rss_mb(server)
    body = {"input": {field: "," * size, "max_tokens": 4}}
    t0 = time.monotonic()
    r = requests.post(server.url + "/predictions", json=body, timeout=60)
    elapsed = time.monotonic() - t0
    _, peak_after = worker_rss_mb(server)
    assert r.status_code == 422, (r.status_code, r.text[:300])
    assert field in r.text[:2000]
    assert peak_after - peak_before < 1, (peak_before, peak_after)
    print(f"{size >> 20} MiB of commas in {field}: 422 in {elapsed * 1e3:.0f} ms (client to answer, "
          f"sending included), worker peak RSS {peak_before:.0f} -> {peak_after:.0f} MB")


def test_the_largest_valid_stop_list_still_works(server, reference_model):
    stops = ",".join("问" * 128 for _ in range(32))
    body = predict(server, stop_sequences=stops, max_tokens=4, seed=1)
    assert body["status"] == "succeeded"


def test_a_cpu_worker_maps_no_triton(server):
    pid = worker_pid(server)
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libtriton" not in maps
    print(f"CPU worker RSS {worker_rss_mb(server)[0]:.0f} MB")


# ---- the watchdog
def test_a_hung_step_turns_health_unhealthy_and_fails_its_requests(app_dir, tmp_path):
    bound = 2
    env = {"GLM_DEVICE": "cpu", "GLM_STEP_TIMEOUT_SECONDS": str(bound), "GLM_TEST_HANG_SECONDS": "30"}
    with CogServer(app_dir, env=env, log_path=str(tmp_path / "server.log")) as srv:
        srv.wait_for({"READY"}, timeout=300)
        results: dict[str, requests.Response] = {}

        def post(name):
            results[name] = srv.predict({"input": {"max_tokens": 8}}, wait_ready=False, timeout=60)

        t0 = time.monotonic()
        threads = [threading.Thread(target=post, args=(n,)) for n in ("stuck", "behind")]
        for t in threads:
            t.start()
            time.sleep(0.1)
        while (status := srv.health()["status"]) != "UNHEALTHY" and time.monotonic() - t0 < 20:
            time.sleep(0.05)
        unhealthy_after = time.monotonic() - t0
        assert status == "UNHEALTHY", status
        assert unhealthy_after < bound + 1, unhealthy_after
        for t in threads:
            t.join(10)
        for name, r in results.items():
            body = r.json()
            assert body["status"] == "failed", (name, body)
            assert f"longer than the {bound}s bound (GLM_STEP_TIMEOUT_SECONDS)" in body["error"], body["error"]
        assert "1 rows" not in srv.logs() and re.search(r"\d+ rows: \d+ prefill tokens", srv.logs())
        print(f"hung step: health UNHEALTHY {unhealthy_after:.2f}s after the request (bound {bound}s); "
              f"{len(results)} requests failed with the watchdog's error")


@pytest.mark.parametrize("name, value", [("GLM_DRAIN_SECONDS", "inf"), ("GLM_DRAIN_SECONDS", "nan"),
                                         ("GLM_DRAIN_SECONDS", "-1"), ("GLM_PREFIX_CACHE_SCOPE", "public")])
def test_a_bad_setting_fails_setup_naming_it(app_dir, tmp_path, name, value):
    with CogServer(app_dir, env={"GLM_DEVICE": "cpu", name: value}, log_path=str(tmp_path / "server.log")) as srv:
        h = srv.wait_for({"SETUP_FAILED", "READY"}, timeout=300)
        assert h["status"] == "SETUP_FAILED"
        assert f"{name}={value!r} must be" in h["setup"]["logs"], h["setup"]["logs"][-2000:]
