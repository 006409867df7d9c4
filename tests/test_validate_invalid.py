"""`visionr1 validate` rejects bad manifests, naming the field, and so does the API server.

Each case is a small mutation of examples/tiny-cpu.yaml with the exact field path the
CLI must print and a piece of its message. Where OpenAPI or CEL can express the rule
(``schema`` / ``cel``), the CRD harness must reject the same manifest at the same field,
so ``kubectl apply`` and ``visionr1 validate`` agree. ``cli-only`` cases say why not.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from crd_harness import cel_errors, structural_errors
from visionr1_operator.api import VisionR1Run
from visionr1_operator.cli import main
from visionr1_operator.manifest import load_runs, validate_document
from visionr1_trainer.config import WIRE

ROOT = Path(__file__).resolve().parents[1]
BASE_FILE = ROOT / "examples" / "tiny-cpu.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BASE: dict = yaml.safe_load(BASE_FILE.read_text())

DELETE = object()  # a mutation value: remove the field


def _steps(path: str) -> list[str | int]:
    """``spec.stages.ptst[1].numGenerations`` -> ``["spec", "stages", "ptst", 1, "numGenerations"]``."""
    return [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]


def set_path(doc: Any, path: str, value: Any) -> None:
    *parents, last = _steps(path)
    for step in parents:
        doc = doc[step]
    if value is DELETE:
        del doc[last]
    else:
        doc[last] = copy.deepcopy(value)


def mutated(changes: dict[str, Any]) -> dict:
    doc = copy.deepcopy(BASE)
    for path, value in changes.items():
        set_path(doc, path, value)
    return doc


@dataclass(frozen=True)
class Case:
    id: str
    where: str  # "schema", "cel" or "cli-only": what in the CRD rejects it
    path: str  # the field path the CLI must print
    message: str  # a substring of the CLI's message
    changes: dict[str, Any] = field(default_factory=dict)
    raw: str | None = None  # the file's text, for cases that are not a mapping

    def text(self) -> str:
        return self.raw if self.raw is not None else yaml.safe_dump(mutated(self.changes), sort_keys=False)


OPENAI_NO_ENDPOINT = {"backend": "openai", "model": "gpt-4o"}
BENCH = BASE["spec"]["data"]["benchmarks"][0]
ALL_OFF = {f"spec.stages.{s}.enabled": False for s in ("bridge", "sft", "grpo", "eval")}
SFT = "spec.stages.sft"
GRPO = "spec.stages.grpo"
PTST = "spec.stages.ptst"

CASES = [
    # --- not a VisionR1Run object at all: kubectl fails to decode these before any
    # schema applies, so there is nothing for the CRD to say (cli-only).
    Case("yaml-syntax", "cli-only", "line 5, column 11", "mapping values are not allowed here",
         raw="apiVersion: visionr1.io/v1alpha1\nkind: VisionR1Run\nmetadata:\n  name: tiny\n    labels: x\n"),
    Case("empty-file", "cli-only", "<file>", "no YAML document", raw="# nothing here\n"),
    Case("list-at-top-level", "cli-only", "<root>", "expected a mapping", raw="- a\n- b\n"),
    # --- the object's type and shape
    Case("wrong-apiVersion", "schema", "apiVersion", "must be 'visionr1.io/v1alpha1'",
         {"apiVersion": "visionr1.io/v1"}),
    Case("wrong-kind", "schema", "kind", "must be 'VisionR1Run'", {"kind": "VisionRun"}),
    Case("missing-spec", "schema", "spec", "required field is missing", {"spec": DELETE}),
    Case("missing-model", "schema", "spec.model", "required field is missing", {"spec.model": DELETE}),
    Case("missing-model-name", "schema", "spec.model.name", "required field is missing",
         {"spec.model.name": DELETE}),
    Case("unknown-spec-field", "schema", "spec.foo", "unknown field", {"spec.foo": 1}),
    Case("unknown-nested-typo", "schema", f"{SFT}.learningrate", "unknown field",
         {f"{SFT}.learningrate": 1e-4}),
    Case("snake-case-field", "schema", f"{PTST}[1].max_completion_length", "unknown field",
         {f"{PTST}[1].maxCompletionLength": DELETE, f"{PTST}[1].max_completion_length": 128}),
    # YAML scalars of the wrong type: the API server does not coerce them, so neither may we.
    Case("int-as-string", "schema", f"{PTST}[0].steps", "valid integer", {f"{PTST}[0].steps": "10"}),
    Case("bool-as-string", "schema", "spec.stages.eval.enabled", "valid boolean",
         {"spec.stages.eval.enabled": "true"}),
    Case("float-as-string", "schema", f"{SFT}.learningRate", "valid number", {f"{SFT}.learningRate": "1e-4"}),
    Case("run-name-too-long", "schema", "metadata.name", "at most 40 characters",
         {"metadata.name": "r" * 41}),
    Case("run-name-uppercase", "schema", "metadata.name", "should match pattern",
         {"metadata.name": "Tiny-CPU"}),
    # --- resources and placement
    Case("memory-with-space", "cel", f"{SFT}.resources.memory", "not a Kubernetes quantity",
         {f"{SFT}.resources.memory": "16 GB"}),
    Case("cpu-lots", "cel", f"{GRPO}.resources.cpu", "not a Kubernetes quantity",
         {f"{GRPO}.resources.cpu": "lots"}),
    Case("rollouts-do-not-split-over-ranks", "cel", f"{GRPO}.rolloutBatchSize", "do not split evenly over 3 ranks",
         {f"{GRPO}.resources.nodes": 3}),
    Case("vllm-tp-does-not-divide-gpus", "cel", f"{GRPO}.vllmTensorParallelSize", "does not divide",
         {f"{GRPO}.vllmTensorParallelSize": 3}),
    Case("cpu-fraction-as-number", "schema", f"{GRPO}.resources.cpu", "as a string",
         {f"{GRPO}.resources.cpu": 0.5}),
    Case("gpus-negative", "schema", f"{SFT}.resources.gpusPerNode", "greater than or equal to 0",
         {f"{SFT}.resources.gpusPerNode": -1}),
    Case("nodes-zero", "schema", f"{GRPO}.resources.nodes", "greater than or equal to 1",
         {f"{GRPO}.resources.nodes": 0}),
    Case("toleration-operator", "schema", f"{SFT}.resources.tolerations[0].operator", "'Exists' or 'Equal'",
         {f"{SFT}.resources.tolerations": [{"key": "gpu", "operator": "In"}]}),
    Case("queue-name-uppercase", "schema", "spec.queueName", "should match pattern",
         {"spec.queueName": "Team-A"}),
    # --- storage and secrets
    Case("storage-http", "schema", "spec.storage.uri", "should match pattern",
         {"spec.storage.uri": "http://minio:9000/runs"}),
    Case("storage-s3-no-bucket", "schema", "spec.storage.uri", "should match pattern",
         {"spec.storage.uri": "s3://"}),
    Case("storage-gs", "schema", "spec.storage.uri", "should match pattern", {"spec.storage.uri": "gs://x"}),
    Case("credentials-with-file-storage", "cel", "spec.storage.credentialsSecret", "only used with s3://",
         {"spec.storage.credentialsSecret": "s3-creds"}),
    Case("endpoint-with-file-storage", "cel", "spec.storage.endpoint", "only used with s3://",
         {"spec.storage.endpoint": "http://minio:9000"}),
    Case("region-with-file-storage", "cel", "spec.storage.region", "only used with s3://",
         {"spec.storage.region": "us-east-1"}),
    Case("secret-name-uppercase", "schema", "spec.model.tokenSecret.name", "should match pattern",
         {"spec.model.tokenSecret": {"name": "HF-Token"}}),
    # A pasted key instead of a model name: rejected before it reaches etcd.
    Case("secret-looking-model", "cel", "spec.model.name", "looks like a secret value",
         {"spec.model.name": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"}),
    Case("openai-key-as-model", "cel", "spec.model.name", "looks like a secret value",
         {"spec.model.name": "sk-proj-AbCdEfGh0123456789"}),
    # --- PTST
    Case("ptst-length-decreases", "cel", f"{PTST}[1].maxCompletionLength", "never tightens",
         {PTST: [{"maxCompletionLength": 128, "numGenerations": 4},
                 {"maxCompletionLength": 64, "numGenerations": 8}]}),
    Case("ptst-unequal-budget", "cel", f"{PTST}[1].numGenerations", "allowUnequalBudget",
         {f"{PTST}[1].numGenerations": 4}),
    Case("ptst-empty", "schema", PTST, "at least 1 item", {PTST: []}),
    Case("ptst-one-generation", "schema", f"{PTST}[0].numGenerations", "greater than or equal to 2",
         {f"{PTST}[0].numGenerations": 1}),
    Case("ptst-too-short", "schema", f"{PTST}[0].maxCompletionLength", "greater than or equal to 16",
         {f"{PTST}[0].maxCompletionLength": 8}),
    # --- stage settings
    Case("sft-lr-above-1", "schema", f"{SFT}.learningRate", "less than 1", {f"{SFT}.learningRate": 1.5}),
    Case("grpo-lr-zero", "schema", f"{GRPO}.learningRate", "greater than 0", {f"{GRPO}.learningRate": 0}),
    Case("epsilon-low-1", "schema", f"{GRPO}.epsilonLow", "less than 1", {f"{GRPO}.epsilonLow": 1.0}),
    Case("loss-aggregation", "schema", f"{GRPO}.lossAggregation", "'token_mean' or 'dr_grpo'",
         {f"{GRPO}.lossAggregation": "mean"}),
    Case("reward-not-hfrrf", "schema", f"{GRPO}.reward", "hfrrf", {f"{GRPO}.reward": "accuracy"}),
    Case("zero-stage-4", "schema", f"{SFT}.deepspeedZeroStage", "0, 1, 2 or 3",
         {f"{SFT}.deepspeedZeroStage": 4}),
    Case("grpo-temperature", "schema", f"{GRPO}.temperature", "less than or equal to 2",
         {f"{GRPO}.temperature": 2.5}),
    Case("eval-temperature", "schema", "spec.stages.eval.temperature", "less than or equal to 2",
         {"spec.stages.eval.temperature": 3}),
    Case("mini-batch-above-rollout", "cel", f"{GRPO}.miniBatchSize", "above rolloutBatchSize (4)",
         {f"{GRPO}.miniBatchSize": 32}),
    Case("shared-prefix-with-checkpointing", "cel", f"{GRPO}.sharedPrefix", "KV cache",
         {f"{GRPO}.sharedPrefix": "on", f"{GRPO}.activationCheckpointing": "on"}),
    Case("reasoning-min-above-max", "cel", "spec.stages.bridge.filters.minReasoningChars",
         "above maxReasoningChars", {"spec.stages.bridge.filters": {"minReasoningChars": 100,
                                                                    "maxReasoningChars": 10}}),
    # --- generators of the bridge stage
    Case("openai-without-endpoint", "cel", "spec.stages.bridge.multimodalModel.endpoint",
         "required when backend is 'openai'", {"spec.stages.bridge.multimodalModel": OPENAI_NO_ENDPOINT}),
    Case("endpoint-on-rule-backend", "cel", "spec.stages.bridge.reasoningModel.endpoint",
         "only used by the 'openai' backend",
         {"spec.stages.bridge.reasoningModel": {"backend": "rule", "endpoint": "http://llm:8000/v1"}}),
    Case("vllm-without-model", "cel", "spec.stages.bridge.reasoningModel.model",
         "required when backend is 'vllm'", {"spec.stages.bridge.reasoningModel": {"backend": "vllm"}}),
    # --- which data each enabled stage needs
    Case("bridge-without-source", "cel", "spec.data.bridgeSource", "required when stages.bridge.enabled",
         {"spec.data.bridgeSource": DELETE}),
    Case("bridge-with-cold-start", "cel", "spec.data.coldStart", "only when stages.bridge.enabled is false",
         {"spec.data.coldStart": {"source": "file://./cold.jsonl"}}),
    Case("sft-without-cold-start", "cel", "spec.data.coldStart", "required when stages.sft is enabled",
         {"spec.stages.bridge.enabled": False}),
    Case("grpo-without-rl", "cel", "spec.data.rl", "required when stages.grpo.enabled",
         {"spec.data.rl": DELETE}),
    Case("eval-without-benchmarks", "cel", "spec.data.benchmarks", "needs at least one benchmark",
         {"spec.data.benchmarks": []}),
    Case("eval-unknown-benchmark", "cel", "spec.stages.eval.benchmarks[1]",
         "'mathvista' is not in data.benchmarks",
         {"spec.stages.eval.benchmarks": ["synthetic", "mathvista"]}),
    Case("duplicate-benchmark", "cel", "spec.data.benchmarks[1].name", "already used by benchmarks[0]",
         {"spec.data.benchmarks": [BENCH, BENCH]}),
    Case("all-stages-disabled", "cel", "spec.stages", "at least one stage must be enabled", ALL_OFF),
    # --- validation during GRPO training (issue 16, item 7)
    Case("validation-without-split", "cel", f"{GRPO}.validation.everySteps", "exactly one of benchmark and data",
         {f"{GRPO}.validation": {"everySteps": 2}}),
    Case("validation-two-splits", "cel", f"{GRPO}.validation.everySteps", "exactly one of benchmark and data",
         {f"{GRPO}.validation": {"everySteps": 2, "benchmark": "synthetic", "data": {"source": "x.jsonl"}}}),
    Case("validation-unknown-benchmark", "cel", f"{GRPO}.validation.benchmark",
         "'mathvista' is not in data.benchmarks", {f"{GRPO}.validation": {"everySteps": 2, "benchmark": "mathvista"}}),
    Case("validation-predictions-only", "cel", f"{GRPO}.validation.benchmark", "predictionsOnly",
         {f"{GRPO}.validation": {"everySteps": 2, "benchmark": "synthetic"},
          "spec.data.benchmarks": [{**BENCH, "predictionsOnly": True}]}),
]


def test_the_table_is_big_and_mostly_enforced_by_the_crd():
    assert len(CASES) >= 35
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.where == "cli-only" for c in CASES) <= 3


def _names(error: str, path: str) -> bool:
    """Whether a harness error is about ``path`` or an object containing it.

    CEL ``fieldPath`` cannot index (``.ptst``), and a rule without one reports at its
    node; either is a prefix of the field the CLI names.
    """
    where = error.split(": ", 1)[0]
    return path == where or path.startswith((where + ".", where + "["))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli_rejects_and_names_the_field(case, tmp_path, capsys):
    manifest = tmp_path / f"{case.id}.yaml"
    manifest.write_text(case.text())

    assert main(["validate", str(manifest)]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    prefix = f"{manifest}: {case.path}: "
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert lines, f"no line starts with {prefix!r} in:\n{err}"
    assert any(case.message in line for line in lines), f"{case.message!r} not in {lines}"


@pytest.mark.parametrize("case", [c for c in CASES if c.where != "cli-only"], ids=lambda c: c.id)
def test_the_crd_rejects_it_too(case):
    doc = mutated(case.changes)
    schema_errors = structural_errors(doc)
    if case.where == "schema":
        assert any(_names(e, case.path) for e in schema_errors), schema_errors
    else:
        # The OpenAPI schema lets it through: the CEL rule is what stops it.
        assert schema_errors == []
        errors = cel_errors(doc)
        assert any(_names(e, case.path) for e in errors), errors


# --- what must stay valid ----------------------------------------------------------------


def _validate(tmp_path: Path, name: str, text: str, capsys) -> tuple[int, str, str]:
    manifest = tmp_path / name
    manifest.write_text(text)
    code = main(["validate", str(manifest)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(example, capsys):
    assert main(["validate", str(example)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and ": valid: VisionR1Run " in out


def test_unequal_budget_is_allowed_when_asked_for(tmp_path, capsys):
    doc = mutated({f"{PTST}[1].numGenerations": 8, f"{GRPO}.allowUnequalBudget": True})
    code, out, err = _validate(tmp_path, "unequal.yaml", yaml.safe_dump(doc), capsys)
    assert (code, err) == (0, ""), err
    assert structural_errors(doc) == [] and cel_errors(doc) == []


def test_multi_document_file_with_two_valid_runs(tmp_path, capsys):
    second = mutated({"metadata.name": "tiny-cpu-2"})
    code, out, err = _validate(tmp_path, "two.yaml", yaml.safe_dump_all([BASE, second]), capsys)
    assert (code, err) == (0, "")
    assert "VisionR1Run tiny-cpu " in out and "VisionR1Run tiny-cpu-2 " in out


def test_multi_document_file_names_the_bad_document(tmp_path, capsys):
    bad = mutated({"metadata.name": "tiny-cpu-2", f"{PTST}[0].numGenerations": 1})
    code, out, err = _validate(tmp_path, "two.yaml", yaml.safe_dump_all([BASE, bad]), capsys)
    assert code == 1 and "Traceback" not in out + err
    path = tmp_path / "two.yaml"
    assert f"{path}: document 2: {PTST}[0].numGenerations: " in err
    assert "document 1:" not in err


# --- round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_round_trip_is_lossless(example):
    for run in load_runs(example):
        for wire in (
            run.model_dump(mode="json", by_alias=True, exclude_none=True),
            run.to_json_dict(),
        ):
            again = validate_document(yaml.safe_load(yaml.safe_dump(wire)))
            assert again == run
            assert VisionR1Run.model_validate(wire, **WIRE) == run
            # What the operator writes back must also pass the API server.
            assert structural_errors(wire) == [] and cel_errors(wire) == []
