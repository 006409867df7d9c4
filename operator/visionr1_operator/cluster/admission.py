"""What the operator checks before it creates anything for a run, beyond the schema.

1. The admin's policy: ServiceAccounts, priority classes, images a run may ask for.
2. Sizes the API server would refuse only at creation: a stage config over what one
   ConfigMap holds.

Creating a run is creating Pods: whoever may create a ``VisionR1Run`` in a namespace
picks its stage pods' ServiceAccount (workload-identity webhooks and the account's pull
secrets apply even though the operator never mounts its token), its priority class (a
critical one preempts other tenants) and its trainer image. On a shared cluster the admin
narrows that with the operator's ``--allow-*`` flags (the chart's ``policy`` values); an
empty list allows anything, as Kubernetes itself would.

A run that fails either is refused like an invalid spec: condition InvalidSpec naming
the field, and no Job is created. Pure: the controller calls ``admission_problems``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import StagePlan
from .jobs import config_text

# A ConfigMap's data may hold at most 1 MiB (core/v1 validation: MaxConfigMapSize); leave
# room for the object's metadata.
MAX_CONFIG_BYTES = (1 << 20) - 16 * 1024


@dataclass(frozen=True)
class Policy:
    service_accounts: tuple[str, ...] = ()  # allowed serviceAccountName values ("default": none set)
    priority_classes: tuple[str, ...] = ()  # allowed priorityClassName values
    image_prefixes: tuple[str, ...] = ()  # an image must start with one of these

    @property
    def restricts(self) -> bool:
        return bool(self.service_accounts or self.priority_classes or self.image_prefixes)


def _settings_path(plan: StagePlan) -> str:
    # Every PTST stage runs with spec.stages.grpo's resources.
    section = "grpo" if plan.kind == "grpo" else plan.name
    return f"stages.{section}.resources"


def policy_problems(plans: list[StagePlan], policy: Policy) -> list[tuple[str, str]]:
    """(field path below spec, message) for everything ``plans`` ask that ``policy`` does not allow."""
    problems: dict[str, str] = {}  # keyed by path: the PTST stages share one
    for plan in plans:
        where, r = _settings_path(plan), plan.resources
        account = r.service_account_name or "default"
        if policy.service_accounts and account not in policy.service_accounts:
            problems[f"{where}.serviceAccountName"] = (
                f"ServiceAccount {account!r} is not allowed by the operator's policy "
                f"(allowed: {', '.join(policy.service_accounts)})")
        if policy.priority_classes and r.priority_class_name and r.priority_class_name not in policy.priority_classes:
            problems[f"{where}.priorityClassName"] = (
                f"priority class {r.priority_class_name!r} is not allowed by the operator's policy "
                f"(allowed: {', '.join(policy.priority_classes)})")
        if policy.image_prefixes and not plan.image.startswith(policy.image_prefixes):
            problems[f"{where}.image"] = (
                f"image {plan.image!r} is not allowed by the operator's policy "
                f"(images must start with: {', '.join(policy.image_prefixes)})")
    return list(problems.items())


def size_problems(plans: list[StagePlan]) -> list[tuple[str, str]]:
    """A stage whose config would not fit its ConfigMap: refused now, with the reason,
    rather than failing every create later with a 422 no condition explains."""
    problems = []
    for plan in plans:
        size = len(config_text(plan.for_attempt(1)).encode())
        if size > MAX_CONFIG_BYTES:
            problems.append((f"stages.{'grpo' if plan.kind == 'grpo' else plan.name}",
                             f"stage {plan.name}'s config is {size} bytes, more than the {MAX_CONFIG_BYTES} "
                             "a ConfigMap holds (long prompts or data inlined in the spec?)"))
    return problems


def admission_problems(plans: list[StagePlan], policy: Policy) -> list[tuple[str, str]]:
    return policy_problems(plans, policy) + size_problems(plans)
