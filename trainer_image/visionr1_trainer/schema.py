"""How every config model behaves: camelCase on the wire, unknown fields rejected, CEL
rules beside pydantic validators, and errors that name the field at fault.

``config/`` (the stage configs) and ``visionr1_operator.api`` (the VisionR1Run) build
on these. Pydantic only: importable without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    GetJsonSchemaHandler,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

# --- shared building blocks -------------------------------------------------------


@dataclass(frozen=True)
class CelRule:
    """A cross-field rule the API server enforces (CRD ``x-kubernetes-validations``).

    Each one mirrors a pydantic validator on the same model, so ``kubectl apply`` and
    ``visionr1 validate`` reject the same manifests.
    """

    rule: str
    message: str
    field_path: str | None = None

    def to_schema(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


# Keyword arguments for validating a document from outside (a manifest, a stage
# config file): camelCase only, as the API server would accept it.
WIRE = {"by_alias": True, "by_name": False}


class Schema(BaseModel):
    """Base of every config model: camelCase aliases, unknown fields rejected."""

    # CEL rules of this model, emitted into its JSON schema (and so the CRD).
    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        validate_by_alias=True,
        # Python code may build models by field name; documents (manifests, stage
        # configs) are validated with by_name=False (see WIRE) so that they use the
        # camelCase names the CRD documents, and nothing else.
        validate_by_name=True,
        serialize_by_alias=True,
        validate_default=True,
    )

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler: GetJsonSchemaHandler):
        json_schema = handler(core_schema)
        rules = [r for klass in reversed(cls.__mro__) for r in vars(klass).get("cel_rules", ())]
        if rules:
            target = handler.resolve_ref_schema(json_schema)
            target["x-kubernetes-validations"] = [r.to_schema() for r in rules]
        return json_schema

    def to_json_dict(self) -> dict[str, Any]:
        """The wire form: camelCase keys, JSON types, defaults included."""
        return self.model_dump(mode="json", by_alias=True)


# A Kubernetes object name (RFC 1123 subdomain), used for Secrets, PVCs, classes.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A Kubernetes label-value-safe name (RFC 1123 label): stage names, benchmark names.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Where artifacts may live: S3 (or an S3-compatible store), a mounted PVC, or a
# local directory (local runs only).
STORAGE_URI = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|file://.+)$"
# A model or data source: a hub id (org/name), or one of the storage URIs above.
HUB_ID = r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?"
SOURCE = rf"^({HUB_ID}|s3://\S+|pvc://\S+|file://\S+|/\S*)$"
HTTP_URL = r"^https?://[^\s/]+(/\S*)?$"

_QUANTITY_RE = re.compile(
    r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)"
    r"(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)
# The same rule as a JSON-schema pattern, for the CRD.
QUANTITY_PATTERN = _QUANTITY_RE.pattern


def _quantity(value: Any) -> str:
    """Accept a Kubernetes resource quantity (``"16Gi"``, ``"500m"``, ``8``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a Kubernetes quantity such as '16Gi' or '500m', got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        # The CRD types quantities as int-or-string, so the API server rejects 0.5.
        raise ValueError(f"write a fractional quantity as a string ('{value}' or '500m'), got {value!r}")
    text = str(value)
    if len(text) > 64 or not _QUANTITY_RE.match(text):
        raise ValueError(
            f"{text!r} is not a Kubernetes quantity (examples: '64Gi', '500m', '8', '1.5')"
        )
    return text


Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    # In the CRD: the one anyOf a structural schema allows under int-or-string is exactly
    # [{type: integer}, {type: string}] (apiextensions-apiserver's intOrStringAnyOf; a
    # minimum or pattern inside a branch makes the whole CRD "not structural"), so the
    # range and the quantity syntax are checked by a CEL rule on the node instead.
    WithJsonSchema({
        "x-kubernetes-int-or-string": True,
        # Bounds the CEL rule's cost (it counts on the longest string the node may hold).
        "maxLength": 64,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "x-kubernetes-validations": [CelRule(
            # CEL string literals take backslash escapes: the regex's "\." is written "\\.".
            rule=f"type(self) == int ? self >= 0 : self.matches('{QUANTITY_PATTERN.replace(chr(92), chr(92) * 2)}')",
            message="must be a Kubernetes quantity such as '64Gi' or '500m', or a non-negative integer",
        ).to_schema()],
    }),
]


# A URL with user-info (``https://user:pass@host``): everything between the scheme and the
# first "/" is the authority, and an "@" there carries credentials. Stricter than RFC 3986
# on purpose ("?" and "#" do not end it here), since URL parsers disagree on where the
# authority ends ("http://evil\\@good/"). No backslashes: the pattern goes into CEL as is.
URL_USERINFO_PATTERN = r"^[A-Za-z][-A-Za-z0-9+.]*://[^/]*@"
_URL_USERINFO = re.compile(URL_USERINFO_PATTERN)
_URL_USERINFO_MESSAGE = ("must not hold credentials (user:password@ in the URL): they would land in "
                         "ConfigMaps, Pod specs, status and logs; give them through a Secret")


def _no_url_credentials(value: Any) -> Any:
    # A before-validator: it runs before the field's pattern, whose error would echo the value.
    if isinstance(value, str) and _URL_USERINFO.match(value):
        raise ValueError(_URL_USERINFO_MESSAGE)
    return value


class _NoUserInfoRule:
    """Adds the CEL twin of ``_no_url_credentials`` to the field's JSON schema (the CRD)."""

    def __get_pydantic_json_schema__(self, core_schema, handler: GetJsonSchemaHandler):
        json_schema = handler(core_schema)
        json_schema.setdefault("x-kubernetes-validations", []).append(
            CelRule(f"!self.matches('{URL_USERINFO_PATTERN}')", _URL_USERINFO_MESSAGE).to_schema())
        return json_schema


# The API server prices every CEL rule by the largest value it may see: a string with no
# maxLength counts as the whole request, and a list of them exceeds the CRD's budget.
MAX_URL_LENGTH = 2048


def url_no_credentials(pattern: str) -> Any:
    """A string type for a URL or URI a user gives: ``pattern`` says which ones it takes, and
    one with user-info is refused, naming the field (the CRD has the same rule in CEL).

    The pattern sits inside the type, not in the field's ``Field(pattern=...)``: pydantic
    drops a field-level pattern from the JSON schema (so from the CRD) of an optional field
    whose type carries a validator.
    """
    return Annotated[str, StringConstraints(pattern=pattern, max_length=MAX_URL_LENGTH),
                     BeforeValidator(_no_url_credentials), _NoUserInfoRule()]


HttpUrlNoCredentials = url_no_credentials(HTTP_URL)  # endpoints: storage, bridge models, judge
SourceNoCredentials = url_no_credentials(SOURCE)  # a model or data source: hub id or URI
StorageUriNoCredentials = url_no_credentials(STORAGE_URI)  # where artifacts live


# How API keys and tokens start (OpenAI, Hugging Face, AWS, GitHub).
SECRET_PREFIX = r"^(sk-|hf_|AKIA|ghp_)"


def _no_secret_literal(value: str) -> str:
    # Secret values never belong in a spec: it lands in etcd, in kubectl get -o yaml,
    # in GitOps repos. Catch the common mistake of pasting a key instead of a name.
    if re.match(SECRET_PREFIX, value):
        raise ValueError("looks like a secret value; give the name of a Secret that holds it")
    return value


# --- error reporting ------------------------------------------------------------------


class FieldProblems(ValueError):
    """Raised by model validators to report problems at sub-paths of the model.

    Pydantic puts a model validator's error at the model's own location; carrying the
    sub-paths lets ``format_errors`` name the exact field
    (``spec.stages.ptst[1].numGenerations``), as a user of kubectl expects.
    """

    def __init__(self, problems: list[tuple[str | tuple, str]]):
        self.problems = [(_as_loc(p), m) for p, m in problems]
        super().__init__("; ".join(f"{_loc_str(p)}: {m}" for p, m in self.problems))


def raise_problems(problems: list[tuple[str | tuple, str]]) -> None:
    if problems:
        raise FieldProblems(problems)


def _as_loc(path: str | tuple) -> tuple:
    if isinstance(path, tuple):
        return path
    loc: list[str | int] = []
    for part in path.split("."):
        name, *indexes = part.split("[")
        if name:
            loc.append(name)
        loc.extend(int(i.rstrip("]")) for i in indexes)
    return tuple(loc)


def _loc_str(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _error_message(err: dict) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field (not in the VisionR1Run schema)"
    if kind == "missing":
        return "required field is missing"
    if kind in ("literal_error", "enum"):
        return f"{err['msg'].replace('Input should be', 'must be')}, got {err.get('input')!r}"
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if "input" in err and kind not in ("value_error",) and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return msg


def format_errors(exc: ValidationError, strip: tuple = ()) -> list[tuple[str, str]]:
    """Turn a pydantic ValidationError into (field path, message) pairs, one per problem."""
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if loc[: len(strip)] == strip:
            loc = loc[len(strip):]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldProblems):
            out.extend((_loc_str(loc + sub), msg) for sub, msg in cause.problems)
        else:
            out.append((_loc_str(loc) or "<root>", _error_message(err)))
    return out
