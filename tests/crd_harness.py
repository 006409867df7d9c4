"""Check manifests against the generated CRD the way the API server would (as far as we can).

Not a test module: ``test_crd.py`` and ``test_validate_invalid.py`` use it to show that
``kubectl apply`` rejects what ``visionr1 validate`` rejects. What the API server does
to a custom resource, in order, and what this module does in its place:

1. prunes ``null`` values of non-nullable fields, then applies the schema's ``default``
   values (``apply_defaults``: only below objects that exist, recursively);
2. validates the OpenAPI v3.0 schema (``structural_errors``: jsonschema, after turning
   the v3.0 dialect into draft 2020-12) and, with strict field validation
   (``kubectl apply`` since 1.27), reports unknown fields instead of pruning them;
3. evaluates every ``x-kubernetes-validations`` CEL rule at its node
   (``cel_errors``: cel-python plus the Kubernetes CEL library functions the rules use).

``structural_problems`` checks the CRD schema itself is structural, which the API
server requires before it accepts the CRD at all.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any, Callable, Iterator

import celpy
import celpy.celtypes as celtypes
import jsonschema
from celpy.adapter import json_to_cel

from visionr1_operator.crd import build_crd

Node = dict[str, Any]
# Keys whose children are schema nodes: what the walkers below descend into.
_LIST_OF_NODES = ("anyOf", "allOf", "oneOf")


@functools.lru_cache(maxsize=1)
def _generated_crd() -> dict[str, Any]:
    return build_crd()


def _crd(crd: dict[str, Any] | None) -> dict[str, Any]:
    return _generated_crd() if crd is None else crd


def openapi_schema(crd: dict[str, Any] | None = None) -> Node:
    """The ``openAPIV3Schema`` of the CRD's (single) served version."""
    (version,) = _crd(crd)["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def path_str(parts: Any) -> str:
    """``("spec", "stages", "ptst", 1, "numGenerations")`` -> ``spec.stages.ptst[1].numGenerations``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


# --- 1. pruning of nulls and defaulting --------------------------------------------------


def prune_nulls(schema: Node, doc: Any) -> None:
    """Drop ``null`` values of fields that are not ``nullable`` (before defaulting).

    The API server does this so ``revision: null`` means "unset", as it does for pydantic.
    """
    if isinstance(doc, dict):
        for key in list(doc):
            child = _child_schema(schema, key)
            if doc[key] is None and child is not None and not child.get("nullable"):
                del doc[key]
            elif child is not None:
                prune_nulls(child, doc[key])
    elif isinstance(doc, list) and "items" in schema:
        for item in doc:
            prune_nulls(schema["items"], item)


def apply_defaults(schema: Node, doc: Any) -> Any:
    """Fill ``default`` values in place, as the API server's structural defaulting does.

    A default applies only where the parent object exists; defaulted values are defaulted
    in turn (``stages: {}`` then ``stages.bridge.enabled: true``), and so are array items
    and map values. Returns ``doc`` for convenience.
    """
    if isinstance(doc, dict):
        for key, prop in schema.get("properties", {}).items():
            # A null of a non-nullable field counts as absent (the server prunes it).
            absent = key not in doc or (doc[key] is None and not prop.get("nullable"))
            if "default" in prop and absent:
                doc[key] = copy.deepcopy(prop["default"])
        for key, value in doc.items():
            child = _child_schema(schema, key)
            if child is not None:
                apply_defaults(child, value)
    elif isinstance(doc, list) and "items" in schema:
        for item in doc:
            apply_defaults(schema["items"], item)
    return doc


def _child_schema(schema: Node, key: str) -> Node | None:
    if key in schema.get("properties", {}):
        return schema["properties"][key]
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def defaulted(doc: dict[str, Any], crd: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``doc`` as the API server would store it: nulls pruned, defaults applied."""
    schema = openapi_schema(crd)
    doc = copy.deepcopy(doc)
    prune_nulls(schema, doc)
    return apply_defaults(schema, doc)


# --- 2. OpenAPI schema and strict field validation ---------------------------------------


def to_json_schema(node: Any) -> Any:
    """Translate an OpenAPI v3.0 structural node into JSON Schema draft 2020-12.

    v3.0 writes an exclusive bound as ``minimum: 0, exclusiveMinimum: true``; 2020-12 as
    ``exclusiveMinimum: 0``. ``nullable: true`` becomes a ``null`` type branch.
    ``x-kubernetes-*`` keys have no JSON Schema meaning and are dropped (int-or-string
    nodes already carry the equivalent ``anyOf``).
    """
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: Node = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "exclusiveMinimum", "exclusiveMaximum"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(child) for name, child in value.items()}
        elif key in ("items", "additionalProperties", "not") or key in _LIST_OF_NODES:
            out[key] = to_json_schema(value)
        else:
            out[key] = copy.deepcopy(value)  # default/enum values are data, not schemas
    for bound in ("Minimum", "Maximum"):
        if node.get(f"exclusive{bound}") is True and bound.lower() in out:
            out[f"exclusive{bound}"] = out.pop(bound.lower())
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


# id(schema) -> (schema, validator); the schema is kept so its id stays unique.
_VALIDATORS: dict[int, tuple[Node, jsonschema.Draft202012Validator]] = {}


def _validator(schema: Node) -> jsonschema.Draft202012Validator:
    """A validator for one schema node, built once (schemas are dicts: cached by id)."""
    key = id(schema)
    cached = _VALIDATORS.get(key)
    if cached is None or cached[0] is not schema:
        cached = (schema, jsonschema.Draft202012Validator(to_json_schema(schema)))
        _VALIDATORS[key] = cached
    return cached[1]



def structural_errors(doc: Any, crd: dict[str, Any] | None = None) -> list[str]:
    """What the API server's schema validation reports for ``doc``, one line per problem.

    Includes the apiVersion/kind check the server does when it routes the request, and
    unknown fields (strict field validation). ``[]`` means the object would be accepted
    as far as the OpenAPI schema goes; see ``cel_errors`` for the CEL rules.
    """
    crd = _crd(crd)
    if not isinstance(doc, dict):
        return [f"<root>: Invalid value: expected an object, got {type(doc).__name__}"]
    errors = _type_errors(doc, crd)
    schema = openapi_schema(crd)
    doc = defaulted(doc, crd)
    for err in sorted(_validator(schema).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        errors.append(_schema_error_line(err))
    errors += [f"{p}: unknown field \"{p}\"" for p in unknown_fields(schema, doc)]
    errors += list(list_map_duplicates(schema, doc))
    return errors


def list_map_duplicates(schema: Node, doc: Any, parts: tuple = ()) -> Iterator[str]:
    """``x-kubernetes-list-type: map``: two items with the same keys, as the API server reports them."""
    if isinstance(doc, dict):
        props = schema.get("properties", {})
        for key, value in doc.items():
            if key in props:
                yield from list_map_duplicates(props[key], value, (*parts, key))
    elif isinstance(doc, list):
        items = schema.get("items", {})
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema["x-kubernetes-list-map-keys"]
            seen = set()
            for i, item in enumerate(doc):
                key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else None
                if key in seen:
                    yield f"{path_str((*parts, i))}: Duplicate value: {dict(zip(keys, key))}"
                seen.add(key)
        for i, item in enumerate(doc):
            yield from list_map_duplicates(items, item, (*parts, i))


def _type_errors(doc: dict[str, Any], crd: dict[str, Any]) -> list[str]:
    spec = crd["spec"]
    api_versions = {f"{spec['group']}/{v['name']}" for v in spec["versions"] if v["served"]}
    errors = []
    if doc.get("apiVersion") not in api_versions:
        errors.append(f"apiVersion: Invalid value: {doc.get('apiVersion')!r}: not served by this CRD")
    if doc.get("kind") != spec["names"]["kind"]:
        errors.append(f"kind: Invalid value: {doc.get('kind')!r}: must be {spec['names']['kind']}")
    if not isinstance(doc.get("metadata"), dict) or not doc["metadata"].get("name"):
        errors.append("metadata.name: Required value: name or generateName is required")
    return errors


def _schema_error_line(err: jsonschema.ValidationError) -> str:
    parts = list(err.absolute_path)
    if err.validator == "required":
        # jsonschema reports a missing field at its parent; the API server names the field.
        missing = [k for k in err.validator_value if k not in err.instance]
        parts += missing[:1]
        return f"{path_str(parts)}: Required value"
    return f"{path_str(parts)}: Invalid value: {err.message}"


def unknown_fields(schema: Node, doc: Any, parts: tuple = ()) -> Iterator[str]:
    """Paths of fields the schema does not declare (what pruning would silently drop).

    ``metadata`` is ObjectMeta, validated by the API server itself, not by the CRD.
    """
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(doc, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in doc.items():
            if parts == () and key == "metadata":
                continue
            if key in props:
                yield from unknown_fields(props[key], value, parts + (key,))
            elif isinstance(extra, dict):
                yield from unknown_fields(extra, value, parts + (key,))
            elif schema.get("type") == "object":
                yield path_str(parts + (key,))
    elif isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            yield from unknown_fields(schema["items"], item, parts + (i,))


# --- 3. CEL rules ---------------------------------------------------------------------------


def _is_sorted(values: celtypes.ListType) -> celtypes.BoolType:
    """Kubernetes lists library: ``<list>.isSorted()``, true in non-decreasing order."""
    return celtypes.BoolType(all(a <= b for a, b in zip(values, values[1:])))


def _starts_with(text: celtypes.StringType, prefix: celtypes.StringType) -> celtypes.BoolType:
    """Standard CEL ``startsWith`` (cel-python has it; redefined to pin its meaning)."""
    return celtypes.BoolType(str(text).startswith(str(prefix)))


# Kubernetes CEL functions the CRD's rules call, by name, on top of cel-python's
# standard library. A rule that calls anything else fails ``unsupported_functions``.
K8S_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "isSorted": _is_sorted,
    "startsWith": _starts_with,
}
# CEL macros (expanded by the parser, not functions) and the standard functions.
CEL_MACROS = {"has", "all", "exists", "exists_one", "map", "filter"}
_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_STRING_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


def called_functions(rule: str) -> set[str]:
    """Names called in a rule (``size``, ``isSorted``...), string literals ignored."""
    return set(_CALL.findall(_STRING_LITERAL.sub("''", rule)))


def unsupported_functions(rule: str) -> set[str]:
    from celpy.evaluation import base_functions

    return called_functions(rule) - CEL_MACROS - set(base_functions) - set(K8S_FUNCTIONS)


_ENV = celpy.Environment()


@functools.lru_cache(maxsize=None)
def compile_rule(rule: str) -> celpy.Runner:
    """Parse a rule once; raises ``celpy.CELParseError`` for a rule that does not parse."""
    return _ENV.program(_ENV.compile(rule), functions=K8S_FUNCTIONS)


def validation_rules(schema: Node, parts: tuple = ()) -> Iterator[tuple[tuple, dict[str, str]]]:
    """Every ``x-kubernetes-validations`` rule with the schema path of its node (``[]`` = items)."""
    for rule in schema.get("x-kubernetes-validations", ()):
        yield parts, rule
    for name, child in schema.get("properties", {}).items():
        yield from validation_rules(child, parts + (name,))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from validation_rules(schema["additionalProperties"], parts + ("{}",))
    if "items" in schema:
        yield from validation_rules(schema["items"], parts + ("[]",))


def cel_errors(doc: Any, crd: dict[str, Any] | None = None) -> list[str]:
    """Failed ``x-kubernetes-validations`` rules on the defaulted ``doc``, one line each.

    A rule runs where its node exists in the object (for each item of an array, each
    value of a map), with ``self`` bound to that value. A rule that cannot be evaluated
    (a missing field, a wrong type) fails, as on the API server.
    """
    if not isinstance(doc, dict):
        return []
    schema = openapi_schema(crd)
    errors: list[str] = []
    _check_rules(schema, defaulted(doc, crd), (), errors)
    return errors


def _check_rules(schema: Node, value: Any, parts: tuple, errors: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations", ()):
        if not _rule_holds(rule["rule"], value):
            where = path_str(parts) + rule.get("fieldPath", "")
            errors.append(f"{where}: Invalid value: {rule['message']} (rule: {rule['rule']})")
    if isinstance(value, dict):
        for key, child_value in value.items():
            child = _child_schema(schema, key)
            if child is not None and not (parts == () and key == "metadata"):
                _check_rules(child, child_value, parts + (key,), errors)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check_rules(schema["items"], item, parts + (i,), errors)


def _rule_holds(rule: str, value: Any) -> bool:
    try:
        result = compile_rule(rule).evaluate({"self": json_to_cel(value)})
    except (celpy.CELEvalError, TypeError, ValueError, KeyError):
        return False
    return isinstance(result, celtypes.BoolType) and bool(result)


# --- the CRD schema itself --------------------------------------------------------------


def structural_problems(schema: Node) -> list[str]:
    """Why the API server would refuse this ``openAPIV3Schema`` as non-structural.

    Every node typed (except int-or-string and preserve-unknown-fields nodes); no
    ``$ref``; no ``additionalProperties: false``; not both ``properties`` and
    ``additionalProperties``; ``anyOf``/``allOf``/``oneOf`` only in the int-or-string
    form; ``nullable`` not used; every default valid against its own node.
    """
    problems: list[str] = []
    _structural_node(schema, (), problems)
    return problems


def _structural_node(node: Node, parts: tuple, problems: list[str]) -> None:
    where = path_str(parts)
    int_or_string = node.get("x-kubernetes-int-or-string")
    if "type" not in node and not int_or_string and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{where}: no type")
    if "$ref" in node:
        problems.append(f"{where}: $ref is not allowed")
    if node.get("additionalProperties") is False:
        problems.append(f"{where}: additionalProperties: false is not allowed")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{where}: properties and additionalProperties are mutually exclusive")
    if "nullable" in node:
        problems.append(f"{where}: nullable (the API server would keep nulls the operator cannot read)")
    for key in _LIST_OF_NODES:
        if key in node and not (key == "anyOf" and int_or_string and _int_or_string_branches(node[key])):
            problems.append(f"{where}: {key} is only allowed in the int-or-string form")
    if "default" in node:
        problems += [f"{where}: default: {p}" for p in _default_problems(node)]
    for name, child in node.get("properties", {}).items():
        _structural_node(child, parts + (name,), problems)
    if isinstance(node.get("additionalProperties"), dict):
        _structural_node(node["additionalProperties"], parts + ("{}",), problems)
    if "items" in node:
        _structural_node(node["items"], parts + ("[]",), problems)


def _int_or_string_branches(branches: list[Node]) -> bool:
    # Exactly apiextensions-apiserver's intOrStringAnyOf, order included: a branch with
    # anything else (minimum, pattern, description) is "must be empty to be structural".
    return branches == [{"type": "integer"}, {"type": "string"}]


def _default_problems(node: Node) -> list[str]:
    value = copy.deepcopy(node["default"])
    prune_nulls(node, value)
    apply_defaults(node, value)
    out = [e.message for e in _validator(node).iter_errors(value)]
    out += [f"unknown field {p!r}" for p in unknown_fields(node, value)]
    return out
