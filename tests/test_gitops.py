"""docs/gitops.md and the files beside it: the Argo CD health check (real Lua 5.1), the Flux
health-check expressions (CEL, evaluated the way Flux does), the YAML, and the commands.

The runs the health checks judge are not written by hand: ``Run`` moves an example
manifest along with the operator's own reconcile (``reconcile.decide``) and hands over the
object as the API server would hold it (``metadata.generation``, the status as the
operator writes it), so a renamed condition or status field breaks these tests.
"""

from __future__ import annotations

import re
import shlex
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import celpy
import pytest
import yaml
from celpy.adapter import json_to_cel
from lupa import lua51

from visionr1_operator.api import CONDITION_TYPES, PLURAL, SHORT_NAMES, SINGULAR, VisionR1RunStatus
from visionr1_operator.cluster.controller import parse_run
from visionr1_operator.cluster.observe import JobView, PodReport
from visionr1_operator.cluster.reconcile import Observed, ReconcileSettings, decide
from visionr1_operator.cluster.status import status_document

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GITOPS = DOCS / "gitops.md"
LUA = DOCS / "argocd" / "visionr1run-health.lua"
ARGOCD_CM = DOCS / "argocd" / "argocd-cm.yaml"
HEALTH_KEY = "resource.customizations.health.visionr1.io_VisionR1Run"
SETTINGS = ReconcileSettings(default_image="visionr1/trainer:test")
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


# --- runs in every state, from the real reconcile --------------------------------------------


class Run:
    """An example run, its Jobs and its status, moved along by ``reconcile.decide``."""

    def __init__(self, example: str = "vision-r1-7b.yaml"):
        self.doc = yaml.safe_load((ROOT / "examples" / example).read_text())
        self.generation = 1
        self.status: VisionR1RunStatus | None = None  # nothing written yet
        self.jobs: dict[str, JobView] = {}
        self.reports: dict[str, PodReport] = {}
        self.now = T0

    def reconcile(self) -> Run:
        run, problems = parse_run(self.doc)
        meta = self.doc["metadata"]
        observed = Observed(
            name=meta["name"], namespace=meta.get("namespace", "default"), generation=self.generation,
            run=run, problems=problems, status=self.status or VisionR1RunStatus(), jobs=dict(self.jobs),
            reports=dict(self.reports), now=self.now,
        )
        decision = decide(observed, SETTINGS)
        if decision.start is not None:  # what the controller does with it: create the Job
            start = decision.start
            state = "Suspended" if start.suspend else "Running"
            self.jobs[start.job_name] = JobView(start.job_name, start.plan.name, start.attempt, "uid", state)
        for name, suspend in decision.suspend_jobs.items():
            self._set_job(name, "Suspended" if suspend else "Running")
        self.status = decision.status
        return self

    def finish_job(self, state: str, **report) -> Run:
        """The current stage's Job ends; the operator sees it on its next reconcile."""
        name = self.status.stages[[r.name for r in self.status.stages].index(self.status.current_stage)].job_name
        self._set_job(name, state, finished_at="2026-01-01T01:00:00Z",
                      reason=None if state == "Succeeded" else "BackoffLimitExceeded")
        self.reports[name] = PodReport(**report)
        return self.reconcile()

    def succeed_all(self) -> Run:
        while self.status.phase != "Succeeded":
            self.finish_job("Succeeded", summary={"step": 1})
        return self

    def edit(self, change: Callable[[dict], Any]) -> Run:
        """A spec change: the API server bumps metadata.generation; nothing reconciled yet."""
        change(self.doc["spec"])
        self.generation += 1
        return self

    def _set_job(self, name: str, state: str, **fields) -> None:
        self.jobs[name] = JobView(**{**self.jobs[name].__dict__, "state": state, **fields})

    def object(self) -> dict[str, Any]:
        obj = {**self.doc, "metadata": {**self.doc["metadata"], "generation": self.generation}}
        if self.status is not None:
            obj["status"] = status_document(self.status)
        return obj


def _no_rl_data(spec: dict) -> None:
    del spec["data"]["rl"]


def _retrying() -> Run:
    return Run().reconcile().finish_job("Failed", failure="pod x exited with code 1: RuntimeError: boom")


def _failed() -> Run:
    run = _retrying()
    while run.status.phase != "Failed":  # every retry fails too, until backoffLimit
        run.now += timedelta(seconds=SETTINGS.retry_max_seconds)  # the backoff is over
        run.reconcile().finish_job("Failed", failure="pod x exited with code 1: RuntimeError: boom")
    return run


def _refused() -> Run:
    """The bridge stage succeeded; then its settings changed: refused, and nothing new starts."""
    run = Run().reconcile().finish_job("Succeeded", summary={"step": 1})
    return run.edit(lambda spec: spec["stages"]["bridge"].update(sampleLimit=10)).reconcile()


# name -> (the run, Argo CD health, Flux: runs.yaml's Kustomization, Flux: the one that waits for the end)
STATES: dict[str, tuple[Callable[[], Run], str, str, str]] = {
    "applied, no status yet": (lambda: Run(), "Progressing", "Unknown", "Unknown"),
    # (Running from the second look: the first creates the Job, whose pods are not up yet.)
    "first stage running": (lambda: Run().reconcile().reconcile(), "Progressing", "Current", "InProgress"),
    "queued in Kueue": (lambda: Run("multinode.yaml").reconcile(), "Progressing", "Current", "InProgress"),
    "retry after a failed attempt": (_retrying, "Progressing", "Current", "InProgress"),
    "suspended": (lambda: Run().reconcile().edit(lambda s: s.update(suspend=True)).reconcile(),
                  "Suspended", "Current", "InProgress"),
    "spec edited, not reconciled yet": (lambda: Run().reconcile().edit(lambda s: s.update(suspend=True)),
                                        "Progressing", "InProgress", "InProgress"),
    "invalid spec": (lambda: Run().reconcile().edit(_no_rl_data).reconcile(), "Degraded", "Failed", "Failed"),
    "change to a finished stage refused": (_refused, "Degraded", "Failed", "Failed"),
    "failed": (_failed, "Degraded", "Failed", "Failed"),
    "succeeded": (lambda: Run().reconcile().succeed_all(), "Healthy", "Current", "Current"),
    "succeeded, then spec edited": (lambda: Run().reconcile().succeed_all().edit(_no_rl_data).reconcile(),
                                    "Healthy", "InProgress", "InProgress"),
}


def test_the_states_are_what_the_reconcile_writes():
    """The runs below are in the state their names say (the health checks are judged on them)."""
    def conditions(run: Run) -> dict[str, str]:
        return {c.type: c.status for c in run.status.conditions}

    assert STATES["applied, no status yet"][0]().status is None
    assert STATES["first stage running"][0]().status.phase == "Running"
    queued = STATES["queued in Kueue"][0]()
    assert (queued.status.phase, queued.status.conditions[0].reason) == ("Pending", "Queued")
    assert STATES["retry after a failed attempt"][0]().status.conditions[0].reason == "RetryBackoff"
    assert STATES["suspended"][0]().status.phase == "Suspended"
    edited = STATES["spec edited, not reconciled yet"][0]()
    assert edited.status.observed_generation == 1 and edited.generation == 2
    assert conditions(STATES["invalid spec"][0]())["InvalidSpec"] == "True"
    refused = STATES["change to a finished stage refused"][0]()
    assert refused.status.conditions[0].reason == "FinishedStageChanged"
    assert STATES["failed"][0]().status.phase == "Failed"
    assert STATES["succeeded"][0]().status.phase == "Succeeded"
    late = STATES["succeeded, then spec edited"][0]()
    assert late.status.phase == "Succeeded" and late.status.observed_generation < late.generation
    for make, *_ in STATES.values():
        run = make()
        if run.status is not None:
            assert set(conditions(run)) == set(CONDITION_TYPES)


# --- Argo CD: the Lua health check ------------------------------------------------------------


@pytest.fixture(scope="module")
def argo_health() -> Callable[[dict], dict]:
    """The health check as Argo CD runs it: a Lua 5.1 chunk with the object in the global ``obj``."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    assert lua.eval("_VERSION") == "Lua 5.1"
    # Always two results (chunk, error), so that lupa hands back a tuple.
    load = lua.eval("function(source) local chunk, error = loadstring(source, '=health.lua'); return chunk, error end")
    chunk, error = load(LUA.read_text())
    assert chunk is not None, error

    def run(obj: dict) -> dict:
        lua.globals().obj = lua.table_from(obj, recursive=True)
        result = dict(chunk().items())
        assert set(result) == {"status", "message"}, result
        return result

    return run


@pytest.mark.parametrize("state", STATES)
def test_argocd_health(argo_health, state):
    make, expected, _, _ = STATES[state]
    run = make()
    health = argo_health(run.object())
    assert health["status"] == expected, health
    assert isinstance(health["message"], str) and health["message"]


def test_argocd_health_messages_come_from_the_conditions(argo_health):
    failed = argo_health(_failed().object())
    assert "stage bridge" in failed["message"] and "RuntimeError: boom" in failed["message"]
    assert "stage bridge is running" in argo_health(Run().reconcile().reconcile().object())["message"]
    assert "waits for its pods to start" in argo_health(Run().reconcile().object())["message"]
    assert "gpu-research" in argo_health(Run("multinode.yaml").reconcile().object())["message"]
    assert "generation 2" in argo_health(STATES["spec edited, not reconciled yet"][0]().object())["message"]
    assert "bridge" in argo_health(_refused().object())["message"]
    assert "data.rl" in argo_health(STATES["invalid spec"][0]().object())["message"]


def test_argocd_cm_carries_the_lua_verbatim():
    (cm,) = yaml.safe_load_all(ARGOCD_CM.read_text())
    assert (cm["kind"], cm["metadata"]["name"], cm["metadata"]["namespace"]) == ("ConfigMap", "argocd-cm", "argocd")
    assert cm["data"][HEALTH_KEY] == LUA.read_text()


# --- Flux: health-check expressions, evaluated as Flux evaluates them ----------------------------


def flux_health(obj: dict, exprs: dict[str, str]) -> str:
    """fluxcd/pkg runtime/cel StatusEvaluator.Evaluate: the generation check, then the
    expressions in the order inProgress, failed, current; none true is InProgress. An
    expression that cannot be evaluated is an error: the status reader reports Unknown."""
    observed = obj.get("status", {}).get("observedGeneration")
    if observed is not None and observed != obj["metadata"].get("generation"):
        return "InProgress"
    env = celpy.Environment()
    activation = {key: json_to_cel(value) for key, value in obj.items()}
    for field, outcome in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if not exprs.get(field):
            continue
        try:
            value = env.program(env.compile(exprs[field])).evaluate(activation)
        except celpy.CELEvalError:
            return "Unknown"
        if isinstance(value, celpy.CELEvalError):
            return "Unknown"
        if value:
            return outcome
    return "InProgress"


def markdown_yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def documents() -> list[tuple[str, dict]]:
    """Every YAML document of the GitOps docs: the files of docs/ and the ```yaml blocks of
    docs/gitops.md (the other pages' blocks are manifest fragments, not objects)."""
    out = []
    for path in sorted(DOCS.rglob("*.yaml")):
        out += [(str(path.relative_to(ROOT)), doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    for path in [DOCS / "gitops.md"]:
        for block in markdown_yaml_blocks(path):
            out += [(str(path.relative_to(ROOT)), doc) for doc in yaml.safe_load_all(block) if doc]
    return out


def flux_health_checks() -> dict[str, dict[str, str]]:
    """Kustomization name -> its VisionR1Run health-check expressions."""
    out = {}
    for _, doc in documents():
        if doc["kind"] != "Kustomization":
            continue
        for check in doc["spec"].get("healthCheckExprs", []):
            if (check["apiVersion"], check["kind"]) == ("visionr1.io/v1alpha1", "VisionR1Run"):
                out[doc["metadata"]["name"]] = check
    return out


FLUX_KUSTOMIZATIONS = {"visionr1-runs-research": 2, "visionr1-runs-done": 3}  # -> the column of STATES


def test_every_flux_health_check_is_tested():
    assert set(flux_health_checks()) == set(FLUX_KUSTOMIZATIONS)


@pytest.mark.parametrize("kustomization", FLUX_KUSTOMIZATIONS)
@pytest.mark.parametrize("state", STATES)
def test_flux_health(kustomization, state):
    exprs = flux_health_checks()[kustomization]
    expected = STATES[state][FLUX_KUSTOMIZATIONS[kustomization]]
    assert flux_health(STATES[state][0]().object(), exprs) == expected


def test_flux_release_upgrades_the_crd():
    (release,) = [doc for _, doc in documents() if doc["kind"] == "HelmRelease"]
    spec = release["spec"]
    assert spec["install"]["crds"] == spec["upgrade"]["crds"] == "CreateReplace"
    assert spec["chart"]["spec"]["chart"] == "./charts/visionr1-operator"
    assert spec["targetNamespace"] == "visionr1-system"


# --- the YAML and the commands -------------------------------------------------------------------


def test_every_yaml_document_in_docs_parses_and_is_an_object():
    docs = documents()
    assert len(docs) >= 7
    for where, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), where


def shell_commands() -> list[list[str]]:
    """The kubectl and helm commands of the ```sh blocks of docs/gitops.md, as argv lists."""
    out = []
    for block in re.findall(r"^```sh\n(.*?)^```", GITOPS.read_text(), flags=re.S | re.M):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] in ("kubectl", "helm"):
                out.append(argv)
    return out


def option(argv: list[str], *names: str) -> list[str]:
    values = []
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name:
                values.append(argv[i + 1])
            elif arg.startswith(name + "="):
                values.append(arg.split("=", 1)[1])
    return values


def subcommand(argv: list[str]) -> str:
    """``apply`` of ``kubectl -n argocd apply ...``."""
    args = iter(argv[1:])
    for arg in args:
        if arg in ("-n", "--namespace"):
            next(args)
        elif not arg.startswith("-"):
            return arg
    return ""


def test_commands_name_files_that_exist():
    commands = shell_commands()
    assert len(commands) >= 10
    files = [f for argv in commands if argv[0] == "kubectl" and subcommand(argv) in ("apply", "patch")
             for f in option(argv, "-f", "--filename", "--patch-file")]
    assert {"examples/vision-r1-7b.yaml", "examples/multinode.yaml", "docs/argocd/argocd-cm.yaml"} <= set(files)
    for name in files:
        assert (ROOT / name).is_file(), name
    (install,) = [argv for argv in commands if argv[:2] == ["helm", "install"]]
    assert install[2:4] == ["visionr1-operator", "charts/visionr1-operator"]  # fullname: visionr1-operator
    assert option(install, "-n") == ["visionr1-system"] and "--create-namespace" in install
    assert (ROOT / install[3]).is_dir()
    for argv in commands:
        if argv[0] == "kubectl" and subcommand(argv) == "apply" and option(argv, "-f")[0].startswith("examples/"):
            assert "--server-side" in argv, argv  # the operator owns status; apply owns the spec


def test_commands_name_runs_the_examples_define():
    """``vr1/NAME -n NS`` is a run of examples/, by a resource name the CRD defines."""
    runs = {}
    for path in (ROOT / "examples").glob("*.yaml"):
        meta = yaml.safe_load(path.read_text())["metadata"]
        runs[meta["name"]] = meta.get("namespace", "default")
    run_resources = {*SHORT_NAMES, SINGULAR, PLURAL}
    named = 0
    for argv in shell_commands():
        verb = subcommand(argv)
        if argv[0] != "kubectl" or verb not in ("get", "describe", "wait"):
            continue
        target = next(arg for arg in argv[argv.index(verb) + 1:] if not arg.startswith("-"))
        kind, _, name = target.partition("/")
        if kind in ("jobs", "events"):
            continue
        assert kind in run_resources, argv
        if name:
            assert runs.get(name) == option(argv, "-n")[0], argv
            named += 1
        for condition in option(argv, "--for"):
            assert condition.removeprefix("condition=") in CONDITION_TYPES, argv
    assert named >= 3


def test_docs_link_files_that_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", GITOPS.read_text()):
        if "://" not in target:
            assert (GITOPS.parent / target).exists(), target
