"""core/v1 Affinity as a typed, bounded schema.

A free-form ``affinity`` (``x-kubernetes-preserve-unknown-fields``) let one tenant store
an object nested 1,500 levels deep, which the API server keeps and every watcher must
parse: kopf's JSON parsing of the list/watch stream hit ``RecursionError`` and its
``visionr1runs`` watcher died, so no other tenant's run got a Job. Typed, the depth is
fixed (at most six levels below ``affinity``) and every list and string has a bound the
API server enforces, so neither the depth nor the size of a run is the tenant's to choose.

Field names, types and enums are Kubernetes' own (k8s.io/api/core/v1 types.go); the
bounds are ours, far above what a scheduler needs.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from visionr1_trainer.schema import CelRule, Schema, raise_problems

# A qualified name with an optional DNS-subdomain prefix: 253 + "/" + 63.
Key = Annotated[str, StringConstraints(min_length=1, max_length=317)]
LabelValue = Annotated[str, StringConstraints(max_length=63)]
# A node field value can be longer than a label value (metadata.name: 253).
Value = Annotated[str, StringConstraints(max_length=253)]
Namespace = Annotated[str, StringConstraints(min_length=1, max_length=63)]
MAX_TERMS = 16
MAX_VALUES = 64
MAX_LABELS = 64


class LabelSelectorRequirement(Schema):
    key: Key = Field(description="Label key the selector applies to.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="Relation of key and values.")
    values: list[LabelValue] = Field(default_factory=list, max_length=MAX_VALUES, description="Label values.")


class LabelSelector(Schema):
    # A structural schema cannot bound map keys (no propertyNames): a CEL rule does.
    cel_rules = (CelRule("self.matchLabels.all(k, size(k) <= 317)", "label keys are at most 317 characters",
                         ".matchLabels"),)

    match_labels: dict[str, LabelValue] = Field(
        default_factory=dict, max_length=MAX_LABELS, description="Labels that must all match."
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=MAX_TERMS, description="Requirements that must all hold."
    )

    @model_validator(mode="after")
    def _key_lengths(self) -> LabelSelector:
        raise_problems([("matchLabels", f"label key of {len(k)} characters (at most 317)")
                        for k in self.match_labels if len(k) > 317])
        return self


class NodeSelectorRequirement(Schema):
    key: Key = Field(description="Node label (or field) key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(
        description="Relation of key and values."
    )
    values: list[Value] = Field(default_factory=list, max_length=MAX_VALUES, description="Values.")


class NodeSelectorTerm(Schema):
    match_expressions: list[NodeSelectorRequirement] = Field(
        default_factory=list, max_length=MAX_TERMS, description="Requirements on node labels."
    )
    match_fields: list[NodeSelectorRequirement] = Field(
        default_factory=list, max_length=MAX_TERMS, description="Requirements on node fields."
    )


class NodeSelector(Schema):
    node_selector_terms: list[NodeSelectorTerm] = Field(
        min_length=1, max_length=MAX_TERMS, description="Terms, any one of which must match."
    )


class PreferredSchedulingTerm(Schema):
    weight: int = Field(ge=1, le=100, description="Weight of this preference.")
    preference: NodeSelectorTerm = Field(description="The preferred nodes.")


class NodeAffinity(Schema):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = Field(
        default=None, description="Nodes the pods must land on."
    )
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = Field(
        default_factory=list, max_length=MAX_TERMS, description="Nodes the pods prefer."
    )


class PodAffinityTerm(Schema):
    label_selector: LabelSelector | None = Field(default=None, description="Pods this term is about.")
    namespace_selector: LabelSelector | None = Field(default=None, description="Namespaces of those pods.")
    namespaces: list[Namespace] = Field(default_factory=list, max_length=MAX_VALUES, description="Namespaces.")
    topology_key: Key = Field(description="Node label whose value defines 'the same place'.")
    match_label_keys: list[Key] = Field(default_factory=list, max_length=MAX_TERMS, description="matchLabelKeys.")
    mismatch_label_keys: list[Key] = Field(
        default_factory=list, max_length=MAX_TERMS, description="mismatchLabelKeys."
    )


class WeightedPodAffinityTerm(Schema):
    weight: int = Field(ge=1, le=100, description="Weight of this preference.")
    pod_affinity_term: PodAffinityTerm = Field(description="The term.")


class PodAffinity(Schema):
    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] = Field(
        default_factory=list, max_length=MAX_TERMS, description="Terms that must hold."
    )
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] = Field(
        default_factory=list, max_length=MAX_TERMS, description="Terms preferred."
    )


class Affinity(Schema):
    """A core/v1 Affinity: where the stage's pods go relative to nodes and other pods."""

    node_affinity: NodeAffinity | None = Field(default=None, description="Node affinity.")
    pod_affinity: PodAffinity | None = Field(default=None, description="Pod affinity.")
    pod_anti_affinity: PodAffinity | None = Field(default=None, description="Pod anti-affinity.")
