"""kopf handlers: a few lines each; the logic lives in ``reconcile`` (pure) and ``controller``.

- a daemon per VisionR1Run runs its reconcile loop (``controller.RunController``);
- an index of the operator's Jobs, by run, is that loop's view of the Jobs: kopf fills it
  from a full listing before any handler runs, so a restarted operator sees every Job
  that exists before it decides anything;
- Job events and run events wake the run's loop.

The handlers run for every watch event, so they are ``async``: kopf runs synchronous
handlers in a thread pool, a hop that costs more than the handlers themselves.

``register`` puts the handlers in a registry: the default one for ``python -m
visionr1_operator``, a fresh one for an operator embedded in a test. The operator's
settings and shared state travel in kopf's ``memo`` (``memo.config``, ``memo.metrics``).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from ..api import GROUP, PLURAL, VERSION
from .controller import Operator
from .naming import LABEL_MANAGED_BY, LABEL_RUN, MANAGED_BY
from .observe import JobView, observe_job

FINALIZER = "visionr1.io/finalizer"
OUR_JOBS = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_RUN: kopf.PRESENT}
# The same filter on the API server: kopf's ``labels=`` filters are applied in the operator,
# after every Job event of the cluster has been sent to it and decoded.
JOBS_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_RUN}"


class SpecDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's default diff base, built without first copying the status it then drops.

    kopf builds a run's "essence" (spec, labels, annotations) on every watch event by
    deep-copying the whole object and deleting the status; a run's status (stage
    records, conditions, summaries) is most of the object.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        if extra_fields:  # a handler that watches a status field: keep kopf's own behaviour
            return super().build(body=body, extra_fields=extra_fields)
        slim = kopf.Body({key: value for key, value in body.items() if key != "status"})
        return super().build(body=slim)


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Settings, once, before anything is watched."""
    settings.persistence.finalizer = FINALIZER
    # The Job list and watch ask the API server for the operator's Jobs only.
    settings.watching.label_selectors["batch", "v1", "jobs"] = JOBS_SELECTOR
    # There are no on.create/on.update handlers, so kopf stores no handler progress; one
    # storage to strip from every run event instead of the default two halves the copying.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="visionr1.io")
    settings.persistence.diffbase_storage = SpecDiffBase()
    # Only Events the reconcile posts on purpose (and kopf's warnings), not one per log line.
    settings.posting.level = logging.WARNING
    memo.operator = Operator(config=memo.config, settings=settings, metrics=memo.metrics)


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    operator: Operator | None = memo.get("operator")
    if operator is not None:
        await operator.close()


async def visionr1_jobs(
    body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any
) -> dict[tuple[str, str], JobView]:
    """Index: (namespace, run) -> the run's Jobs, condensed (the full objects are not kept)."""
    return {(namespace, labels[LABEL_RUN]): observe_job(body)}


async def job_changed(body: kopf.Body, namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    await memo.operator.job_event(namespace, labels[LABEL_RUN], observe_job(body))


async def run_changed(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    forget_managed_fields(body)
    memo.operator.run_changed(namespace, name, body)
    await memo.operator.acknowledge_if_finished(namespace, name, body)


def forget_managed_fields(body: kopf.Body) -> None:
    """Drop ``metadata.managedFields`` from the run's body that kopf keeps.

    kopf keeps every run's latest body for its daemon for as long as the run exists, also
    after the daemon has returned (``process_spawning_cause`` sets it again on each event),
    and replaces its content on every watch event. The operator never reads managedFields
    (the API server's record of who set which field: for a run, each manager's copy of the
    spec's or the status's shape), a large part of a run's body. This handler sees each
    event's body before the next one replaces it, so the kept body is without them.
    """
    raw = getattr(body, "_src", None)  # kopf's live view over the event's decoded object
    meta = raw.get("metadata") if isinstance(raw, dict) else None
    if isinstance(meta, dict):
        meta.pop("managedFields", None)


async def run_stages(
    body: kopf.Body, stopped: kopf.DaemonStopped, memo: kopf.Memo, visionr1_jobs: kopf.Index,
    logger: kopf.Logger, **_: Any,
) -> None:
    """The run's reconcile loop; returns when the run has succeeded or failed."""
    await memo.operator.serve_run(body, visionr1_jobs, stopped, logger)


async def liveness(memo: kopf.Memo, **_: Any) -> int:
    """Runs this operator tracks, reported as ``{"runs": N}`` by kopf's liveness endpoint (/healthz)."""
    operator: Operator | None = memo.get("operator")
    return len(operator.metrics.phases) if operator else 0


def register(registry: kopf.OperatorRegistry) -> kopf.OperatorRegistry:
    """Register every handler of the operator into ``registry``."""
    kopf.on.startup(registry=registry)(configure)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.on.probe(registry=registry, id="runs")(liveness)
    kopf.index("batch", "v1", "jobs", labels=OUR_JOBS, registry=registry, id="visionr1_jobs")(visionr1_jobs)
    kopf.on.event("batch", "v1", "jobs", labels=OUR_JOBS, registry=registry)(job_changed)
    kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)(run_changed)
    # Told to stop, the loop exits at its next await; cancelled only if it has not in 5 s.
    kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_backoff=5.0,
                cancellation_timeout=10.0)(run_stages)
    return registry
