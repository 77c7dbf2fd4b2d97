"""Write .cog/openapi_schema.json for this project's predictor, as `cog build` 0.23.1 ships it.

`cog build` writes this file into the image; the Cog server (coglet) reads it at startup to
validate inputs, serve /openapi.json and stream server-sent events. Without a Docker engine / cog
CLI we produce the same file here. The Input schema is what cog's static parser reads from
predict.py's source (devtools/cog_static_schema.py, a port of cog's Go rules): cog never imports
predict.py, so a keyword it cannot resolve is missing from the image's schema too. Types, the
Output schema and the paths come from cog's own runtime inspector (cog._inspector).

Usage: script/openapi-schema [--predictor predict.py:Predictor] [--out .cog/openapi_schema.json]
                             [--runtime-inputs]
Run from the project directory (the predictor module is imported from cwd); `python -m
devtools.openapi_schema` with the checkout on PYTHONPATH does the same. --runtime-inputs
keeps the inspector's Input schema (Python's values) instead: the tests compare the two.
"""
import argparse
import json
import os
import sys
from dataclasses import MISSING, Field

def _default_of(field):
    """Return (has_default, value) for an InputField default."""
    d = field.default
    if isinstance(d, Field):
        if d.default_factory is not MISSING:  # type: ignore[misc]
            return True, d.default_factory()  # type: ignore[misc]
        if d.default is not MISSING:
            return True, d.default
        return False, None
    if d is None:
        return False, None
    return True, d


def _num(x):
    """Bounds are stored as floats by cog; emit integral ones as ints."""
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


def _is_streaming(path, cls_name, method_names=("predict", "run")):
    """True when the predict()/run() method carries the @cog.streaming decorator.

    cog.streaming is a no-op at runtime; `cog build` detects it statically and
    marks the operation with x-cog-streaming, which coglet needs before it
    will answer `Accept: text/event-stream`. We do the same with `ast`.
    """
    import ast

    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), filename=path)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls_name:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in method_names:
                    for dec in item.decorator_list:
                        target = dec.func if isinstance(dec, ast.Call) else dec
                        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                        if name == "streaming":
                            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == cls_name:
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                if name == "streaming":
                    return True
    return False


def build_schema(info, streaming=False):
    from cog import _adt as adt

    props = {}
    required = []
    enums = {}
    for name, f in info.inputs.items():
        prop = {"x-order": f.order}
        if f.choices is not None:
            jt = f.type.primitive.json_type()
            enums[name] = {
                "title": name,
                "description": "An enumeration.",
                "enum": list(f.choices),
                "type": jt.get("type", "string"),
            }
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = name.replace("_", " ").title()
            prop.update(f.type.json_type())
        nullable = f.type.repetition in (adt.Repetition.OPTIONAL, adt.Repetition.OPTIONAL_REPEATED)
        has_default, default = _default_of(f)
        if has_default:
            prop["default"] = f.type.json_encode(default)
        elif not nullable:
            required.append(name)
        if nullable:
            prop["nullable"] = True
        if f.description is not None:
            prop["description"] = f.description
        if f.ge is not None:
            prop["minimum"] = _num(f.ge)
        if f.le is not None:
            prop["maximum"] = _num(f.le)
        if f.min_length is not None:
            prop["minLength"] = f.min_length
        if f.max_length is not None:
            prop["maxLength"] = f.max_length
        if f.regex is not None:
            prop["pattern"] = f.regex
        if f.deprecated:
            prop["deprecated"] = True
        props[name] = prop

    input_schema = {"title": "Input", "type": "object", "properties": props}
    if required:
        input_schema["required"] = required

    ok = {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}
    verr = {
        "description": "Validation Error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
    }
    dt = {"type": "string", "format": "date-time"}
    schemas = {"Input": input_schema, "Output": info.output.json_type()}
    schemas.update(enums)
    schemas.update({
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {
                "id": {"title": "Id", "type": "string"},
                "input": {"$ref": "#/components/schemas/Input"},
            },
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "input": {"$ref": "#/components/schemas/Input"},
                "output": {"$ref": "#/components/schemas/Output"},
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": {"title": "Created At", **dt},
                "started_at": {"title": "Started At", **dt},
                "completed_at": {"title": "Completed At", **dt},
                "status": {"title": "Status", "type": "string"},
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string"},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {
            "title": "Status",
            "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "type": "string",
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {
                "detail": {
                    "title": "Detail",
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/ValidationError"},
                }
            },
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
    })
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": ok}}},
        "/health-check": {
            "get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get", "responses": {"200": ok}}
        },
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": {
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}
                },
                "responses": {
                    "200": {
                        "description": "Successful Response",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}
                        },
                    },
                    "422": verr,
                },
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": "Prediction Id", "type": "string"},
                        "name": "prediction_id",
                        "in": "path",
                    }
                ],
                "responses": {"200": ok, "422": verr},
            }
        },
    }
    if streaming:
        paths["/predictions"]["post"]["x-cog-streaming"] = True
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predictor", default=os.environ.get("COG_PREDICT_TYPE_STUB", "predict.py:Predictor"))
    ap.add_argument("--out", default=os.path.join(".cog", "openapi_schema.json"))
    ap.add_argument("--runtime-inputs", action="store_true",
                    help="Input schema from the imported predictor instead of cog's static reading")
    args = ap.parse_args(argv)

    from cog._inspector import create_predictor

    path, _, cls = args.predictor.partition(":")
    module = os.path.splitext(path)[0].replace(os.sep, ".")
    sys.path.insert(0, os.getcwd())
    import warnings

    with warnings.catch_warnings():
        # cog 0.23 flags BasePredictor/predict() as deprecated aliases of BaseRunner/run(); the
        # server still serves them and cog.yaml keeps `predict:`, so the warning is noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        info = create_predictor(module, cls)
    schema = build_schema(info, streaming=_is_streaming(path, cls))
    if not args.runtime_inputs:
        from devtools.cog_static_schema import input_schema

        with open(path, encoding="utf-8") as fh:
            schema["components"]["schemas"]["Input"] = input_schema(fh.read(), cls)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(schema, fh, ensure_ascii=False, indent=2)
        fh.write("\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({len(info.inputs)} inputs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
