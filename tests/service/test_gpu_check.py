"""script/gpu-check: its report logic, and one whole run under the Triton interpreter (the tiny
checkpoints on CPU tensors), which must execute and pass every correctness item."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time

import pytest

from bench.gpu_check import report
from bench.gpu_check.correctness import junit_counts
from bench.gpu_check.report import Absent, Report, Skip, run_item
from devtools.cogserver import REPO

CORRECTNESS = ["kernel_selftest", "reference_vectors", "kernels_vs_interpreter", "kernels_bitwise", "mma_gemv", "batch_invariance",
               "prefix_cache_exact", "cuda_graphs", "device_tests"]
SPEED = {"chatglm2-6b-int4_write": {"write_s", "checkpoint_mb"}, "chatglm2-6b-int4_load": {"load_s", "layers"},
         "chatglm2-6b-int4_ttft_prefill": {"ttft_s", "prefill_tok_s"},
         "chatglm2-6b-int4_decode": {"batch1_decode_tok_s", "batch2_decode_tok_s"},
         "chatglm2-6b-int4_decode_long": {"batch1_decode_tok_s", "context_tokens"},
         "chatglm2-6b-int4_chat_round2": {"ttft_cached_s", "ttft_uncached_s", "cached_prompt_tokens"},
         "chatglm2-6b-int4_peak_memory": {"peak_rss_gib"}}


# ---- the report
def test_an_item_reports_figures_a_verdict_a_skip_an_absence_or_the_failure():
    assert run_item("a", "speed", lambda: {"x": 1}, 5).status == "figure"
    item = run_item("b", "correctness", lambda: ("pass", "fine", {"n": 2}), 5)
    assert (item.status, item.detail, item.figures) == ("pass", "fine", {"n": 2})

    def skip():
        raise Skip("no cog")

    def absent():
        raise Absent("no graphs")

    def broken():
        raise ValueError("bad shape")
    assert (run_item("c", "server", skip, 5).status, run_item("d", "correctness", absent, 5).status) == ("skipped", "absent")
    failed = run_item("e", "correctness", broken, 5)
    assert failed.status == "fail" and failed.detail.startswith("ValueError: bad shape (test_gpu_check.py:")


def test_an_item_past_its_limit_fails_and_the_next_one_runs():
    def contained():  # as the engine does: an error inside a step is caught and the loop goes on
        while True:
            try:
                time.sleep(0.05)
            except Exception:  # noqa: BLE001
                pass
    t = time.monotonic()
    item = run_item("slow", "correctness", contained, 0.3)
    assert (item.status, item.detail) == ("fail", "timed out after 0s") and time.monotonic() - t < 3
    assert run_item("next", "correctness", lambda: ("pass", "", {}), 5).status == "pass"


def test_ok_only_when_every_correctness_item_passed_or_is_absent(tmp_path):
    r = Report(tmp_path / "r.json", {})
    r.add(report.Item("a", "correctness", "pass"))
    r.add(report.Item("g", "correctness", "absent"))
    r.add(report.Item("s", "server", "skipped"))
    assert r.ok and json.loads((tmp_path / "r.json").read_text())["ok"] is True
    r.add(report.Item("v", "correctness", "skipped"))
    assert not r.ok
    r.items.pop()
    r.add(report.Item("f", "speed", "fail"))
    assert not r.ok


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite>'
                   '<testcase classname="tests.test_a" name="ok"/>'
                   '<testcase classname="tests.test_a" name="bad"><failure message="x"/></testcase>'
                   '<testcase classname="tests.test_b" name="gpu"><skipped message="needs CUDA"/></testcase>'
                   '<testcase classname="tests.test_b" name="err"><error message="y"/></testcase>'
                   '</testsuite></testsuites>')
    assert junit_counts(xml) == {"passed": 1, "failed": ["test_a::bad"], "errors": ["test_b::err"],
                                 "skipped": {"test_b::gpu": "needs CUDA"}}


# ---- the whole command under the interpreter
@pytest.fixture(scope="module")
def interpreted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, TRITON_INTERPRET="1")
    t = time.monotonic()
    proc = subprocess.run([os.path.join(REPO, "script", "gpu-check"), "--interpret", "--quick", "--out", str(out),
                           "--deadline", "420"], cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    print(f"gpu-check --interpret --quick: {time.monotonic() - t:.0f}s\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    return proc, json.loads((out / "gpu-check.json").read_text())


def test_every_correctness_item_runs_and_passes_under_the_interpreter(interpreted_run):
    proc, doc = interpreted_run
    items = {i["name"]: i for i in doc["items"]}
    graphs = importlib.util.find_spec("glm.gpu.graphs") is not None
    for name in CORRECTNESS:
        want = "absent" if name == "cuda_graphs" and not graphs else "pass"
        assert items[name]["kind"] == "correctness" and items[name]["status"] == want, items[name]
    assert sorted(n for n, i in items.items() if i["kind"] == "correctness") == sorted(CORRECTNESS)
    assert items["batch_invariance"]["figures"]["peak_batch"] == items["batch_invariance"]["figures"]["streams"] >= 3
    assert items["prefix_cache_exact"]["figures"]["cached_prompt_tokens"] > 0
    if graphs:  # decode batches of 1, 2 and 3 rows: the 3 padded to bucket 4
        assert set(items["cuda_graphs"]["figures"]["replays_by_bucket"]) == {"1", "2", "4"}, items["cuda_graphs"]
    assert items["device_tests"]["figures"]["passed"] >= 2
    assert items["reference_vectors"]["figures"].keys() == {"glm2_model.data", "glm3_model.data", "glm_model.data"}
    assert doc["ok"] is True and proc.returncode == 0, proc.stdout[-3000:]
    assert "every correctness item passed" in proc.stdout


def test_the_json_schema_speed_figures_and_server(interpreted_run):
    proc, doc = interpreted_run
    assert doc["schema"] == report.SCHEMA and doc["interpret"] is True and doc["quick"] is True
    assert set(doc["counts"]) == set(report.STATUSES) and sum(doc["counts"].values()) == len(doc["items"])
    for item in doc["items"]:
        assert set(item) == {"name", "kind", "status", "detail", "figures", "seconds", "cpu_seconds"}, item
        assert item["kind"] in report.KINDS and item["status"] in report.STATUSES
    items = {i["name"]: i for i in doc["items"]}
    assert items["environment"]["status"] == "figure" and items["environment"]["figures"]["torch"]
    for name, keys in SPEED.items():
        assert items[name]["status"] == "figure" and keys <= items[name]["figures"].keys(), items[name]
    assert not any(n.startswith("chatglm-6b-int8") for n in items)  # --quick
    server = items["cog_server_stream"]
    assert server["status"] == "pass", server  # cog and coglet are test requirements
    assert server["figures"]["metrics"]["output_token_count"] > 0
    assert any("] INFO loading checkpoint" in line for line in server["figures"]["log"]), server["figures"]["log"]
