"""Issue 18, finding 5 (the spec side): no URL a user gives may carry user-info.

``https://minioadmin:SuperSecret123@minio...`` as ``storage.endpoint`` used to pass
``visionr1 validate`` and the CRD, and then reached the ConfigMap, the Job's environment,
and through a storage error the termination message, status, Events and the report.
Each URL field refuses it, naming the field and never echoing the value: the CLI
(pydantic), the CRD's CEL rule (the harness here, the real API server below), and the
stage configs the trainer reads.
"""

from __future__ import annotations

import json
import re

import pytest
from crd_harness import cel_errors, structural_errors
from test_validate_invalid import mutated

from visionr1_operator.cli import main
from visionr1_trainer.config import (
    BridgeStageConfig,
    DatasetRef,
    GeneratorSpec,
    JudgeSpec,
    ModelSpec,
    StorageSpec,
)

SECRET = "SuperSecret123"
OPENAI = {"backend": "openai", "model": "teacher", "endpoint": "https://api.example.com/v1"}
# field path -> mutations of the tiny example that put credentials in that URL
CASES = {
    "spec.storage.endpoint": {"spec.storage.uri": "s3://bucket/runs",
                              "spec.storage.endpoint": f"https://minioadmin:{SECRET}@minio.example:9000"},
    "spec.model.name": {"spec.model.name": f"s3://admin:{SECRET}@bucket/model"},
    "spec.model.processor": {"spec.model.processor": f"file://admin:{SECRET}@host/proc"},
    "spec.data.rl.source": {"spec.data.rl.source": f"s3://u:{SECRET}@bucket/rl"},
    "spec.stages.bridge.multimodalModel.endpoint": {
        "spec.stages.bridge.multimodalModel": {**OPENAI, "endpoint": f"https://key:{SECRET}@api.example.com/v1"}},
    "spec.stages.bridge.reasoningModel.endpoint": {
        "spec.stages.bridge.reasoningModel": {**OPENAI, "endpoint": f"http://{SECRET}@10.0.0.1:8000/v1"}},
    "spec.stages.eval.judge.endpoint": {
        "spec.stages.eval.judge": {"endpoint": f"https://x:{SECRET}@judge.example/v1", "model": "gpt-4o-mini"}},
}
MESSAGE = "must not hold credentials"


@pytest.mark.parametrize("path", CASES)
def test_validate_refuses_credentials_in_each_url_naming_the_field(path, tmp_path, capsys):
    manifest = tmp_path / "run.json"
    manifest.write_text(json.dumps(mutated(CASES[path])))
    assert main(["validate", str(manifest)]) == 1
    out, err = capsys.readouterr()
    assert any(line.startswith(f"{manifest}: {path}: ") and MESSAGE in line for line in err.splitlines()), err
    assert SECRET not in out + err  # the refusal does not spread the secret either


@pytest.mark.parametrize("path", CASES)
def test_the_crd_refuses_it_by_cel(path):
    doc = mutated(CASES[path])
    assert structural_errors(doc) == []  # the OpenAPI patterns let it through; CEL stops it
    errors = cel_errors(doc)
    assert any(e.startswith(path) and MESSAGE in e for e in errors), errors


@pytest.mark.parametrize("make", [
    lambda v: StorageSpec(uri="s3://bucket/p", endpoint=v),
    lambda v: StorageSpec(uri=v),
    lambda v: ModelSpec(name=v),
    lambda v: DatasetRef(source=v),
    lambda v: GeneratorSpec(backend="openai", model="m", endpoint=v),
    lambda v: GeneratorSpec(backend="hf", model=v),
    lambda v: JudgeSpec(endpoint=v, model="m"),
])
@pytest.mark.parametrize("value", [f"https://a:{SECRET}@h.example/v1", f"s3://a:{SECRET}@bucket/x",
                                   f"http://{SECRET}@h.example/", f"file://a:{SECRET}@host/x"])
def test_every_url_model_refuses_user_info(make, value):
    with pytest.raises(ValueError, match=MESSAGE) as info:
        make(value)
    assert "credentials" in str(info.value)


def test_urls_without_user_info_still_pass():
    assert StorageSpec(uri="s3://bucket/p", endpoint="https://minio.example:9000").endpoint
    assert DatasetRef(source="s3://bucket/path/with@sign/rows.jsonl").source  # '@' in the path is fine
    assert ModelSpec(name="Qwen/Qwen2.5-VL-7B-Instruct").name


def test_stage_configs_refuse_it_too(tmp_path):
    from visionr1_trainer.config import ConfigError, load_stage_config

    config = {
        "kind": "bridge", "run": "r", "stage": "bridge", "outputUri": f"s3://u:{SECRET}@bucket/out",
        "storage": {"uri": "s3://bucket"}, "model": {"name": "Qwen/Qwen2.5-VL-7B-Instruct"},
        "source": {"source": "s3://bucket/src"},
        "bridge": {"multimodalModel": {"backend": "rule"}, "reasoningModel": {"backend": "rule"}},
    }
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        load_stage_config(path)
    assert re.search(rf"outputUri: {MESSAGE}", str(info.value)) and SECRET not in str(info.value)
    assert BridgeStageConfig  # the model the file is validated with


@pytest.fixture(scope="module")
def crd_cluster(cluster):
    import time
    from pathlib import Path

    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                    str(Path(__file__).resolve().parents[1] / "crds"))
    # Right after a create the CRD may have no status.conditions yet, which `kubectl wait`
    # reports as an error rather than waiting: poll instead.
    deadline = time.monotonic() + 60
    while "True" not in cluster.kubectl("get", "crd/visionr1runs.visionr1.io", "-o",
                                        "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                                        check=False).stdout:
        assert time.monotonic() < deadline, "the CRD never became Established"
        time.sleep(0.5)
    cluster.wait_for_resource("vr1")
    return cluster


@pytest.mark.cluster
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", CASES)
def test_the_api_server_refuses_it(path, crd_cluster):
    doc = mutated(CASES[path])
    out = crd_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(doc), check=False)
    assert out.returncode != 0, f"the API server accepted credentials in {path}"
    assert path in out.stderr and MESSAGE in out.stderr, out.stderr
