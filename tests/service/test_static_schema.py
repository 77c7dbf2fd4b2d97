"""The input schema the image ships is cog's static reading of predict.py (cog build never imports
it); every Input keyword must read there exactly as Python evaluates it, and the schema the test
suite serves must be that static one."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

from devtools.cog_static_schema import UNRESOLVED, input_schema, predict_inputs
from devtools.cogserver import REPO

PREDICT_PY = os.path.join(REPO, "predict.py")


def _source() -> str:
    with open(PREDICT_PY, encoding="utf-8") as fh:
        return fh.read()


def _python_inputs():
    """predict()'s parameters as Python builds them: {name: cog FieldInfo}."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import predict

    params = list(inspect.signature(predict.Predictor.predict).parameters.values())[1:]
    return predict, {p.name: p.default for p in params}


KEYWORDS = ("default", "description", "ge", "le", "min_length", "max_length", "regex", "choices",
            "deprecated", "accept")


def test_every_input_keyword_resolves_statically_to_its_python_value():
    static = predict_inputs(_source())
    _, python = _python_inputs()
    assert list(static) == list(python)
    for name, info in python.items():
        given = {k: getattr(info, k) for k in KEYWORDS if getattr(info, k) is not None}
        read = {k: v for k, v in static[name].items() if not k.startswith("_")}
        for kw, value in read.items():
            assert value is not UNRESOLVED, f"{name}: cog cannot read {kw}= (use a literal)"
            want = getattr(info, kw)
            assert value == want and type(value) in (type(want), float), (
                f"{name}: cog reads {kw}={value!r}, Python has {want!r}")
        assert set(given) <= set(read), f"{name}: keywords cog does not see: {set(given) - set(read)}"


def test_schema_bounds_are_the_module_constants():
    import glm.sampling

    predict, _ = _python_inputs()
    props = input_schema(_source())["properties"]
    assert props["seed"]["maximum"] == predict.MAX_SEED == 2**32 - 1
    assert props["max_tokens"]["maximum"] == predict.MAX_TOKENS_LIMIT
    assert props["prompt"]["maxLength"] == predict.MAX_PROMPT_CHARS
    assert props["stop_sequences"]["maxLength"] == predict.MAX_STOP_SEQUENCES_CHARS
    assert props["cache_key"]["maxLength"] == predict.MAX_CACHE_KEY_CHARS
    # A prompt at the cap is more than the largest context holds; every valid stop list fits its cap.
    assert predict.MAX_PROMPT_CHARS >= predict.MAX_TOKENS_LIMIT * 16
    assert predict.MAX_STOP_SEQUENCES_CHARS >= glm.sampling.MAX_STOP_STRINGS * (glm.sampling.MAX_STOP_CHARS + 1)


def test_static_schema_values():
    schema = input_schema(_source())
    assert "required" not in schema  # a request may send no input at all
    props = schema["properties"]
    assert list(props) == ["prompt", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                           "stop_sequences", "seed", "cache_key"]
    for name in ("prompt", "temperature", "top_p", "seed"):  # empty = the loaded model's default / random
        assert props[name]["default"] is None and props[name]["nullable"] is True, name
    assert props["prompt"]["minLength"] == 1
    assert "'[Round 1]\\n\\n问：...\\n\\n答：'" in props["prompt"]["description"]  # shown as \n, one literal
    assert (props["temperature"]["minimum"], props["temperature"]["maximum"]) == (0, 5)
    assert (props["top_p"]["minimum"], props["top_p"]["maximum"]) == (0, 1)
    assert props["max_tokens"]["default"] == 2048 and props["stop_sequences"]["default"] == ""
    assert props["cache_key"]["default"] == "" and "nullable" not in props["cache_key"]
    for p in props.values():
        assert p["description"] and '" "' not in p["description"]


# ---- the port itself, on what the issue saw cog 0.23.1 do (pkg/schema/python, see cog_static_schema)
SNIPPET = '''
from typing import Optional
from cog import BasePredictor, Input
DEFAULTS = {"prompt": "hi"}
LIMIT = 10
NAME = "named"
class Predictor(BasePredictor):
    def predict(
        self,
        a: str = Input(description="x\\ny", default=DEFAULTS["prompt"]),
        b: str = Input(description="one " "two", default="""r1
r2"""),
        c: int = Input(default=LIMIT, ge=0, le=LIMIT),
        d: float = Input(description=NAME, default=-0.5, ge=-1, le=2**3),
        e: Optional[int] = Input(description=r"raw\\n", default=None, le=0x10),
        f: str = Input(description=("paren"), default=f"x"),
    ) -> str:
        return ""
'''


def test_port_reads_like_cog():
    inputs = predict_inputs(SNIPPET)
    assert inputs["a"]["default"] is None  # subscript: unresolvable -> None
    assert inputs["a"]["description"] == "x\\ny"  # no escape processing
    assert inputs["b"]["description"] == 'one " "two'  # concatenation cut as one literal
    assert inputs["b"]["default"] == "r1\nr2"  # triple quotes keep real newlines
    assert inputs["c"]["default"] == 10 and inputs["c"]["le"] is UNRESOLVED  # names: defaults only
    assert inputs["d"]["description"] == "named" and inputs["d"]["default"] == -0.5
    assert inputs["d"]["ge"] == -1.0 and inputs["d"]["le"] is UNRESOLVED  # expressions: dropped
    assert inputs["e"]["description"] == "raw\\n" and inputs["e"]["le"] is UNRESOLVED  # ParseFloat("0x10")
    assert inputs["f"]["description"] is UNRESOLVED and inputs["f"]["default"] is None
    schema = input_schema(SNIPPET)
    assert schema["required"] == ["a", "f"]  # None default on a non-Optional input: required
    assert schema["properties"]["e"]["default"] is None and schema["properties"]["e"]["nullable"] is True
    assert "maximum" not in schema["properties"]["c"] and schema["properties"]["c"]["minimum"] == 0


# ---- the schema the test suite serves
def _schema_script(tmp_path, *args):
    out = tmp_path / f"schema{len(args)}.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "script", "openapi-schema"), "--out", str(out),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_served_schema_is_the_static_one_and_agrees_with_python(tmp_path):
    served = _schema_script(tmp_path)["components"]["schemas"]["Input"]
    assert served == input_schema(_source())
    runtime = _schema_script(tmp_path, "--runtime-inputs")["components"]["schemas"]["Input"]
    assert list(served["properties"]) == list(runtime["properties"])
    assert served.get("required") == runtime.get("required")
    for name, prop in served["properties"].items():
        other = dict(runtime["properties"][name])
        if prop.get("nullable") and prop.get("default", 0) is None:
            other.setdefault("default", None)  # cog's Go writes a None default out; the inspector omits it
        assert prop == other, name
