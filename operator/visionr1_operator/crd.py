"""Generate the VisionR1Run CustomResourceDefinition from the pydantic models.

Pydantic writes JSON Schema (2020-12); Kubernetes wants a *structural* OpenAPI v3.0
schema: every node typed, no ``$ref``, no ``null`` branches, ``exclusiveMinimum`` as a
boolean, and defaults that the API server applies itself. ``structural()`` does that
conversion; ``build_crd()`` wraps it in the CRD object. ``crds/visionr1run.yaml`` is
this module's output, checked in, and a test fails when the two drift apart.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault

from . import api

# Keys of a JSON schema node that carry over unchanged into the CRD.
_KEEP = {
    "type", "description", "default", "enum", "format", "pattern",
    "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
    "minProperties", "maxProperties", "required",
}


class _WithFactoryDefaults(GenerateJsonSchema):
    """Also emit defaults that come from a ``default_factory``.

    The API server fills nested defaults only below objects that exist, so an object
    field defaults to its whole default value: the CEL rules can then read
    ``self.stages.bridge.enabled`` on a manifest that never mentions stages, and the
    default itself passes the rules when the server checks it at CRD creation.
    """

    def get_default_value(self, schema):
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        value = factory()
        if isinstance(value, BaseModel):
            # Whole, not {}: the API server checks each default against the node's CEL
            # rules without filling the nested defaults first, so a rule reading
            # self.benchmarks refuses a default of {} ("no such key") and the CRD with it.
            return _dump(value)
        if isinstance(value, list):
            return [_dump(v) if isinstance(v, BaseModel) else v for v in value]
        return value if value is not None else NoDefault


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


# The only anyOf a structural schema may carry under x-kubernetes-int-or-string, branch
# for branch (apiextensions-apiserver pkg/apiserver/schema/validation.go, intOrStringAnyOf).
INT_OR_STRING_ANY_OF = [{"type": "integer"}, {"type": "string"}]


class SchemaConversionError(Exception):
    """The pydantic schema uses a construct a structural schema cannot express."""


def structural(node: dict[str, Any], defs: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Convert one pydantic JSON-schema node (and its children) into structural form."""
    node = _resolve(node, defs)
    if node.get("default", 0) is None:
        node = {k: v for k, v in node.items() if k != "default"}
    if node.get("x-kubernetes-int-or-string"):
        if node.get("anyOf") != INT_OR_STRING_ANY_OF:
            raise SchemaConversionError(
                f"{path}: an int-or-string node's anyOf must be exactly {INT_OR_STRING_ANY_OF} "
                "(constraints go into x-kubernetes-validations)"
            )
        return _copy_keys(node, {"description", "default", "x-kubernetes-validations"}) | {
            "x-kubernetes-int-or-string": True,
            "anyOf": INT_OR_STRING_ANY_OF,
        }
    out = _copy_keys(node, _KEEP)
    if "const" in node:
        out["enum"] = [node["const"]]
    if "exclusiveMinimum" in node:  # OpenAPI v3.0 keeps the bound in minimum
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        out["maximum"], out["exclusiveMaximum"] = node["exclusiveMaximum"], True
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            out[key] = value
    if "type" not in out:
        raise SchemaConversionError(f"{path or '<root>'}: no type in {sorted(node)}")
    if out["type"] == "object":
        _convert_object(node, out, defs, path)
    elif out["type"] == "array":
        out["items"] = structural(node["items"], defs, f"{path}[]")
    return out


def _convert_object(node: dict, out: dict, defs: dict, path: str) -> None:
    if out.get("x-kubernetes-preserve-unknown-fields"):
        return  # free-form (affinity, summaries): the server keeps it as is
    if "properties" in node:
        out["properties"] = {
            name: structural(child, defs, f"{path}.{name}")
            for name, child in node["properties"].items()
        }
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and extra:
        out["additionalProperties"] = structural(extra, defs, f"{path}{{}}")
    elif extra is True or (isinstance(extra, dict) and not extra):
        out["x-kubernetes-preserve-unknown-fields"] = True
    # additionalProperties: false (extra="forbid") has no structural form: the server
    # prunes unknown fields, and kubectl's strict field validation reports them.


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline ``$ref``/``allOf`` and drop the ``null`` branch of ``X | None``."""
    while True:
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        elif "allOf" in node and len(node["allOf"]) == 1:
            node = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
        elif "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
            branches = [b for b in node["anyOf"] if b != {"type": "null"}]
            if len(branches) != 1:
                raise SchemaConversionError(f"unsupported union: {node['anyOf']}")
            node = {**branches[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        else:
            return node


def _copy_keys(node: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k in keys}


def openapi_schema() -> dict[str, Any]:
    """The CRD's ``openAPIV3Schema``."""
    raw = api.VisionR1Run.model_json_schema(
        by_alias=True, mode="validation", schema_generator=_WithFactoryDefaults
    )
    defs = raw.get("$defs", {})
    props = raw["properties"]
    return {
        "type": "object",
        "description": raw.get("description", ""),
        "required": ["spec"],
        "properties": {
            # Kubernetes validates these itself; a CRD may only restrict metadata.name and
            # generateName (the name the API server makes from it is 5 characters longer).
            "apiVersion": {"type": "string", "description": "visionr1.io/v1alpha1"},
            "kind": {"type": "string", "description": "VisionR1Run"},
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": api.MAX_RUN_NAME,
                        "pattern": defs["ObjectMeta"]["properties"]["name"]["pattern"],
                    },
                    "generateName": {
                        "type": "string",
                        "maxLength": api.MAX_GENERATE_NAME,
                        "description": f"At most {api.MAX_GENERATE_NAME} characters: the API server "
                        f"appends 5, and a run name has at most {api.MAX_RUN_NAME}.",
                    },
                },
            },
            "spec": structural(props["spec"], defs, "spec"),
            "status": structural(props["status"], defs, "status"),
        },
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
    {"name": "Reward", "type": "number", "jsonPath": ".status.progress.reward"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "visionr1", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["visionr1"],
            },
            "versions": [{
                "name": api.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": openapi_schema()},
            }],
        },
    }


HEADER = (
    "# Generated by `visionr1 crd` from operator/visionr1_operator/api.py. Do not edit:\n"
    "# change the models and run `make crd` (a test fails when this file drifts).\n"
)


class _NoAliasDumper(yaml.SafeDumper):
    """Repeated sub-schemas are written out in full: anchors make the CRD hard to read."""

    def ignore_aliases(self, data) -> bool:
        return True


def render_crd_yaml() -> str:
    return HEADER + yaml.dump(build_crd(), Dumper=_NoAliasDumper, sort_keys=False, width=100)
