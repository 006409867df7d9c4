"""`python -m visionr1_operator.cluster.uninstall`: leave every run deletable without the operator.

The operator puts two finalizers on what it manages: kopf's ``visionr1.io/finalizer`` on
each VisionR1Run (kopf needs one to stop a run's daemon before the run goes) and
``visionr1.io/attempt-outcome`` on each attempt's Job (kept until the run's status records
what the Job did). With the operator gone for good, nothing would remove them: a run, or
a Job its deletion cascades to, would wait in Terminating forever.

The Helm chart runs this as a ``pre-delete`` hook of ``helm uninstall``: it scales the
operator's Deployment to zero and waits for its pods to go (a running operator would
put kopf's finalizer straight back), then removes both finalizers everywhere the
operator works. The runs and their Jobs stay (Helm keeps the CRD); deleting them later
needs no operator. This is what KubeRay documents as a manual step for its own
finalizer; Kubeflow's training operator has none on its jobs, which kopf's daemons do
not allow here.

By hand, with the operator stopped: ``python -m visionr1_operator.cluster.uninstall
[--namespace NS ...] [--kubeconfig FILE]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Sequence

from ..api import GROUP, PLURAL, VERSION
from .handlers import FINALIZER as RUN_FINALIZER
from .handlers import JOBS_SELECTOR
from .naming import JOB_FINALIZER

JSON_PATCH = "application/json-patch+json"


def without(finalizers: list[str], finalizer: str) -> list[dict[str, Any]]:
    """A JSON patch that removes one finalizer, valid only if the list is still ``finalizers``."""
    return [
        {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
        {"op": "replace", "path": "/metadata/finalizers", "value": [f for f in finalizers if f != finalizer]},
    ]


def _strip(items: list[dict[str, Any]], finalizer: str, read: Callable[[str, str], dict],
           patch: Callable[[str, str, list], Any], what: str, log: Callable[[str], None]) -> int:
    from kubernetes.client.exceptions import ApiException

    count = 0
    for item in items:
        meta = item["metadata"]
        for _ in range(5):
            finalizers = list(meta.get("finalizers") or [])
            if finalizer not in finalizers:
                break
            try:
                patch(meta["name"], meta["namespace"], without(finalizers, finalizer))
                count += 1
                log(f"removed {finalizer} from {what} {meta['namespace']}/{meta['name']}")
                break
            except ApiException as exc:
                if exc.status == 404:
                    break
                if exc.status not in (409, 422):  # 422: the test op failed, the list changed
                    raise
                meta = read(meta["name"], meta["namespace"])["metadata"]
    return count


def stop_deployment(apps, core, namespace: str, name: str, timeout: float, log: Callable[[str], None]) -> None:
    """Scale the operator's Deployment to zero and wait until none of its pods is left."""
    deployment = apps.read_namespaced_deployment(name, namespace)
    selector = ",".join(f"{k}={v}" for k, v in sorted(deployment.spec.selector.match_labels.items()))
    apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": 0}})
    log(f"scaled Deployment {namespace}/{name} to 0; waiting for its pods to go")
    deadline = time.monotonic() + timeout
    while core.list_namespaced_pod(namespace, label_selector=selector).items:
        if time.monotonic() > deadline:
            raise SystemExit(f"error: the pods of Deployment {namespace}/{name} are still there after {timeout:.0f}s")
        time.sleep(1)


def release(batch, custom, namespaces: Sequence[str], log: Callable[[str], None]) -> tuple[int, int]:
    """Remove the operator's finalizers from every run and Job in ``namespaces`` (all if empty)."""
    runs, jobs = [], []
    for namespace in namespaces or [None]:
        if namespace is None:
            runs += custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
            jobs += [j.to_dict() for j in batch.list_job_for_all_namespaces(label_selector=JOBS_SELECTOR).items]
        else:
            runs += custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
            jobs += [j.to_dict() for j in batch.list_namespaced_job(namespace, label_selector=JOBS_SELECTOR).items]
    jobs = [{"metadata": {"name": j["metadata"]["name"], "namespace": j["metadata"]["namespace"],
                          "finalizers": j["metadata"].get("finalizers")}} for j in jobs]
    n_jobs = _strip(jobs, JOB_FINALIZER,
                    lambda n, ns: batch.read_namespaced_job(n, ns).to_dict(),
                    lambda n, ns, body: batch.patch_namespaced_job(n, ns, body, _content_type=JSON_PATCH), "Job", log)
    n_runs = _strip(runs, RUN_FINALIZER,
                    lambda n, ns: custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, n),
                    lambda n, ns, body: custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, n, body,
                                                                              _content_type=JSON_PATCH),
                    "VisionR1Run", log)
    return n_runs, n_jobs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m visionr1_operator.cluster.uninstall", description=__doc__.splitlines()[0])
    p.add_argument("-n", "--namespace", action="append", default=[], help="only this namespace (repeatable)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else $KUBECONFIG)")
    p.add_argument("--stop-deployment", metavar="NAMESPACE/NAME",
                   help="first scale this Deployment (the operator) to 0 and wait for its pods to go")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the operator's pods")
    args = p.parse_args(argv)

    from kubernetes import client, config

    if args.kubeconfig:
        config.load_kube_config(args.kubeconfig)
    else:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    api = client.ApiClient()
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.stop_deployment:
        namespace, _, name = args.stop_deployment.partition("/")
        if not name:
            p.error("--stop-deployment takes NAMESPACE/NAME")
        stop_deployment(client.AppsV1Api(api), client.CoreV1Api(api), namespace, name, args.timeout, log)
    runs, jobs = release(client.BatchV1Api(api), client.CustomObjectsApi(api), args.namespace, log)
    log(f"done: finalizers removed from {runs} runs and {jobs} Jobs; they can be deleted without the operator")
    return 0


if __name__ == "__main__":
    sys.exit(main())
