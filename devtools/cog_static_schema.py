"""The Input schema `cog build` 0.23.1 ships, read from predict.py's source the way cog reads it.

cog does not import predict.py: it parses it (tree-sitter) and resolves each Input(...) keyword
from literals only. This is a port of those rules onto Python's own parser, for tests and for
script/openapi-schema. The Go sources it follows (cog 0.23.1, pkg/schema/):

- python/inputs.go   parseInputCall: default via resolveDefaultExpr (unresolvable -> None);
                     description via resolveStringExpr; ge/le/min_length/max_length only via
                     parseNumberLiteral (a number literal, no names); regex/accept string literals.
- python/literals.go parseDefaultValue (None/True/False, integer via strconv.ParseInt(text, 0, 64),
                     float via strconv.ParseFloat, string/concatenated_string, -number, list, dict);
                     parseStringLiteral: the source text between the quotes, no escape processing,
                     prefixes only r"/r'; a concatenated string is cut as one ("a" "b" -> a" "b).
- python/module_scope.go collectModuleScope: top-level `NAME = <literal>`; resolveStringExpr and
                     resolveDefaultExpr fall back to those names, nothing else does.
- openapi_spec.go    buildInputSchema: title, type, x-order, default, nullable, required,
                     description, minimum/maximum, minLength/maxLength, pattern.

Only what predict.py may use is ported (str/int/float/bool, Optional[...], keyword Input() calls);
anything else raises Unsupported so a test fails loudly instead of guessing.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize

UNRESOLVED = object()  # the keyword was given but cog cannot read it


class Unsupported(ValueError):
    pass


# ------------------------------------------------------------------------------- literals.go
def _go_parse_int(text: str):
    """strconv.ParseInt(text, 0, 64): base prefixes and underscores as in Go, int64 range."""
    t = text.strip()
    body = t.lstrip("+-")
    if re.fullmatch(r"0[0-7_]+", body):  # Go base 0: a leading 0 means octal
        t = t.replace(body, "0o" + body[1:], 1)
    try:
        n = int(t, 0)
    except ValueError:
        return UNRESOLVED
    return n if -(2**63) <= n < 2**63 else UNRESOLVED


_GO_FLOAT = re.compile(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|infinity|nan)", re.IGNORECASE)


def _go_parse_float(text: str):
    """strconv.ParseFloat(text, 64) for decimal text (hex floats and underscores: not ported)."""
    t = text.strip()
    if not _GO_FLOAT.fullmatch(t):
        return UNRESOLVED
    return float(t)


def _go_string_literal(text: str):
    """parseStringLiteral: strip the quotes of the source text, nothing else."""
    if text.startswith('"""') or text.startswith("'''"):
        return text[3:-3] if len(text) >= 6 else UNRESOLVED
    if text.startswith('"') or text.startswith("'"):
        return text[1:-1] if len(text) >= 2 else UNRESOLVED
    if text.startswith('r"') or text.startswith("r'"):
        return text[2:-1] if len(text) >= 3 else UNRESOLVED
    return UNRESOLVED


class _Source:
    """predict.py's text, with the tree-sitter view of a node cog's rules need."""

    def __init__(self, text: str):
        self.text = text
        self.tree = ast.parse(text)
        self._lines = text.splitlines(keepends=True)
        self._offsets = [0]
        for line in self._lines:
            self._offsets.append(self._offsets[-1] + len(line.encode("utf-8")))
        self._bytes = text.encode("utf-8")

    def segment(self, node: ast.AST) -> str:
        """tree-sitter's Content(node): the node's exact source text (ast offsets are in bytes)."""
        start = self._offsets[node.lineno - 1] + node.col_offset
        end = self._offsets[node.end_lineno - 1] + node.end_col_offset
        return self._bytes[start:end].decode("utf-8")

    def parenthesized(self, keyword: ast.keyword) -> bool:
        """`name=(value)` is a parenthesized_expression node for tree-sitter, not the value."""
        start = self._offsets[keyword.lineno - 1] + keyword.col_offset
        value = keyword.value
        vstart = self._offsets[value.lineno - 1] + value.col_offset
        between = self._bytes[start:vstart].decode("utf-8")
        return "(" in between.split("=", 1)[1]

    def node_type(self, node: ast.AST) -> str:
        """The tree-sitter node type for the node kinds cog's rules look at."""
        if isinstance(node, ast.Constant):
            if node.value is None:
                return "none"
            if node.value is True:
                return "true"
            if node.value is False:
                return "false"
            if isinstance(node.value, (str, bytes)):
                strings = [t for t in tokenize.generate_tokens(io.StringIO(self.segment(node)).readline)
                           if t.type == tokenize.STRING]
                return "concatenated_string" if len(strings) > 1 else "string"
            if isinstance(node.value, bool):
                return "true" if node.value else "false"
            if isinstance(node.value, int):
                return "integer"
            if isinstance(node.value, float):
                return "float"
            return "other"
        if isinstance(node, ast.JoinedStr):
            return "string"
        if isinstance(node, ast.UnaryOp):
            return "unary_operator"
        if isinstance(node, ast.Name):
            return "identifier"
        if isinstance(node, ast.List):
            return "list"
        if isinstance(node, ast.Dict):
            return "dictionary"
        if isinstance(node, ast.Tuple):
            return "tuple"
        return type(node).__name__

    # parseDefaultValue
    def default_value(self, node: ast.AST):
        kind = self.node_type(node)
        text = self.segment(node)
        if kind == "none":
            return None
        if kind in ("true", "false"):
            return kind == "true"
        if kind == "integer":
            return _go_parse_int(text)
        if kind == "float":
            return _go_parse_float(text)
        if kind in ("string", "concatenated_string"):
            return _go_string_literal(text)
        if kind == "unary_operator":
            n = _go_parse_int(text)
            return n if n is not UNRESOLVED else _go_parse_float(text)
        if kind == "list":
            items = [self.default_value(e) for e in node.elts]
            return UNRESOLVED if any(i is UNRESOLVED for i in items) else items
        if kind == "dictionary":
            return {self.default_value(k): self.default_value(v) for k, v in zip(node.keys, node.values)
                    if k is not None and UNRESOLVED not in (self.default_value(k), self.default_value(v))}
        if kind == "tuple":
            return [v for v in (self.default_value(e) for e in node.elts) if v is not UNRESOLVED]
        return UNRESOLVED

    # parseNumberLiteral
    def number(self, node: ast.AST):
        return _go_parse_float(self.segment(node))


# --------------------------------------------------------------------------- module_scope.go
def module_scope(src: _Source) -> dict:
    """collectModuleScope: top-level `NAME = <literal>` bindings (last one wins)."""
    scope = {}
    for stmt in src.tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target, value = stmt.target, stmt.value
        else:
            continue
        if isinstance(target, ast.Name):
            v = src.default_value(value)
            if v is not UNRESOLVED:
                scope[target.id] = v
    return scope


def _resolve_default(src: _Source, node: ast.AST, scope: dict):
    v = src.default_value(node)
    if v is UNRESOLVED and isinstance(node, ast.Name) and node.id in scope:
        return scope[node.id]
    return v


def _resolve_string(src: _Source, node: ast.AST, scope: dict):
    v = _go_string_literal(src.segment(node))
    if v is UNRESOLVED and isinstance(node, ast.Name) and isinstance(scope.get(node.id), str):
        return scope[node.id]
    return v


# --------------------------------------------------------------------------------- inputs.go
def input_keywords(src: _Source, call: ast.Call, scope: dict) -> dict:
    """parseInputCall: {keyword: value cog reads}, UNRESOLVED where it reads nothing."""
    out = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise Unsupported("**kwargs in Input()")
        if src.parenthesized(kw):  # a parenthesized_expression: no rule reads it
            value = UNRESOLVED
        elif kw.arg == "default":
            value = _resolve_default(src, kw.value, scope)
        elif kw.arg == "description":
            value = _resolve_string(src, kw.value, scope)
        elif kw.arg in ("ge", "le", "min_length", "max_length"):
            value = src.number(kw.value)
        elif kw.arg in ("regex", "accept"):
            value = _go_string_literal(src.segment(kw.value))
        elif kw.arg == "deprecated":
            value = src.default_value(kw.value) if src.node_type(kw.value) in ("true", "false") else UNRESOLVED
        else:
            raise Unsupported(f"Input keyword {kw.arg!r} is not ported")
        out[kw.arg] = value
    if call.args:
        raise Unsupported("positional arguments to Input()")
    return out


_PRIMITIVES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}


def _field_type(src: _Source, annotation: ast.AST) -> tuple:
    """(json type, nullable) for the annotations predict.py uses."""
    text = src.segment(annotation).replace(" ", "")
    m = re.fullmatch(r"Optional\[(\w+)\]|(\w+)\|None", text)
    name, nullable = ((m[1] or m[2]), True) if m else (text, False)
    if name not in _PRIMITIVES:
        raise Unsupported(f"annotation {text!r} is not ported")
    return _PRIMITIVES[name], nullable


def predict_inputs(text: str, cls: str = "Predictor", method: str = "predict") -> dict:
    """{input name: {keyword: static value}} plus '_type' and '_nullable', in parameter order."""
    src = _Source(text)
    scope = module_scope(src)
    for node in src.tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for fn in node.body:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name == method:
                    return _inputs_of(src, fn, scope)
    raise Unsupported(f"{cls}.{method} not found")


def _inputs_of(src: _Source, fn, scope: dict) -> dict:
    args = fn.args
    if args.posonlyargs or args.vararg or args.kwarg or args.kwonlyargs:
        raise Unsupported("only plain parameters are ported")
    params = args.args[1:]  # self
    defaults = [None] * (len(params) - len(args.defaults)) + list(args.defaults)
    inputs = {}
    for p, d in zip(params, defaults):
        if p.annotation is None:
            raise Unsupported(f"parameter {p.arg} has no annotation (cog refuses it)")
        jtype, nullable = _field_type(src, p.annotation)
        if d is None:
            kws = {}
        elif isinstance(d, ast.Call) and src.segment(d.func) == "Input":
            kws = input_keywords(src, d, scope)
        else:
            kws = {"default": _resolve_default(src, d, scope)}
            if kws["default"] is UNRESOLVED:
                raise Unsupported(f"parameter {p.arg}: cog refuses a default it cannot resolve")
        # inputs.go: an Input(default=...) cog cannot resolve becomes None
        if kws.get("default", None) is UNRESOLVED:
            kws["default"] = None
        inputs[p.arg] = dict(kws, _type=jtype, _nullable=nullable)
    return inputs


# ----------------------------------------------------------------------------- openapi_spec.go
def title_case(name: str) -> str:
    """openapi TitleCase: words split on '_', each capitalized, joined by spaces."""
    return " ".join(w[:1].upper() + w[1:] for w in name.split("_"))


def input_schema(text: str, cls: str = "Predictor", method: str = "predict") -> dict:
    """buildInputSchema: the components.schemas.Input object cog ships for predict.py's text."""
    props, required = {}, []
    for order, (name, f) in enumerate(predict_inputs(text, cls, method).items()):
        prop = {"x-order": order, "title": title_case(name), "type": f["_type"]}
        nullable = f["_nullable"]
        # A None default on a non-nullable field is no default: the input is required.
        has_default = "default" in f and (f["default"] is not None or nullable)
        if not has_default:
            required.append(name)
        else:
            prop["default"] = f["default"]
        if nullable:
            prop["nullable"] = True
        for kw, key in (("description", "description"), ("ge", "minimum"), ("le", "maximum"),
                        ("min_length", "minLength"), ("max_length", "maxLength"), ("regex", "pattern")):
            if f.get(kw, UNRESOLVED) is not UNRESOLVED:
                v = f[kw]
                prop[key] = int(v) if kw in ("min_length", "max_length") else v
        if f.get("deprecated") is True:
            prop["deprecated"] = True
        props[name] = prop
    schema = {"title": "Input", "type": "object", "properties": props}
    if required:
        schema["required"] = required
    return schema
