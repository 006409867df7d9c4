"""Issue 18, finding 5 (the output side): no planted secret appears in anything a stage writes.

URLs with credentials are refused (test_safety_urls.py), so a secret reaches a stage only
through the environment its Secrets are mapped into: storage keys, the hub token, the
bridge's and the judge's API keys. Each gets a distinct planted value; a local run of the
bridge stage then talks to an endpoint that is hostile in the worst way (it refuses every
request and echoes the key back in its error body), and every output is searched: the
CLI's output and the stage's logs, the stage summary (the termination message), the
metrics log, the status file, every committed file and the HTML report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_openai import FakeOpenAIServer
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PLANTED = {
    "AWS_ACCESS_KEY_ID": "planted-aws-access-key-id-1a2b",
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-access-key-3c4d",
    "AWS_SESSION_TOKEN": "planted-aws-session-token-5e6f",
    "HF_TOKEN": "planted-hub-token-7a8b",
    "VISIONR1_BRIDGE_MULTIMODAL_API_KEY": "planted-multimodal-api-key-9c0d",
    "VISIONR1_BRIDGE_REASONING_API_KEY": "planted-reasoning-api-key-1e2f",
    "VISIONR1_JUDGE_API_KEY": "planted-judge-api-key-3a4b",
}


class EchoingEndpoint(FakeOpenAIServer):
    """Refuses every request with 401, echoing the caller's key in the error body."""

    def handle(self, handler, body):
        auth = handler.headers.get("Authorization", "")
        self.reply(handler, 401, {"error": {"message": f"invalid key {auth}; api_key={auth[7:]}",
                                            "key": auth[7:]}})


def planted_in(text: str) -> list[str]:
    return [name for name, value in PLANTED.items() if value in text]


def test_no_planted_secret_reaches_any_output(tmp_path):
    server = EchoingEndpoint()
    try:
        source = tmp_path / "src"
        source.mkdir()
        rows = []
        for i in range(3):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(source / f"{i}.png")
            rows.append({"id": f"r{i}", "image": f"{i}.png", "question": f"What is {i}+1?", "answer": str(i + 1)})
        (source / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        generator = {"backend": "openai", "model": "teacher", "endpoint": server.url, "maxRetries": 0}
        manifest = {
            "apiVersion": "visionr1.io/v1alpha1", "kind": "VisionR1Run", "metadata": {"name": "leaky"},
            "spec": {
                "model": {"name": f"file://{tmp_path}/model", "tokenSecret": {"name": "hub"}},
                "storage": {"uri": f"file://{tmp_path}/runs"},  # the storage keys: in the env only
                "data": {"bridgeSource": {"source": f"file://{source}/rows.jsonl"}},
                "stages": {
                    "bridge": {"multimodalModel": {**generator, "apiKeySecret": {"name": "mm"}},
                               "reasoningModel": {**generator, "apiKeySecret": {"name": "rs"}},
                               "resources": {"gpusPerNode": 0}},
                    "sft": {"enabled": False}, "grpo": {"enabled": False},
                    "eval": {"enabled": True, "judge": {"endpoint": server.url, "model": "judge",
                                                        "apiKeySecret": {"name": "judge"}}},
                },
            },
        }
        manifest["spec"]["stages"]["eval"]["enabled"] = False  # a judge spec without a stage to run
        path = tmp_path / "run.json"
        path.write_text(json.dumps(manifest))
        env = {**os.environ, **PLANTED, "HF_HUB_OFFLINE": "1", "AWS_EC2_METADATA_DISABLED": "true"}
        run = subprocess.run([sys.executable, "-m", "visionr1_operator.cli", "run", str(path)],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        report = subprocess.run([sys.executable, "-m", "visionr1_operator.cli", "report", str(path)],
                                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    finally:
        server.close()

    outputs = {"visionr1 run output": run.stdout + run.stderr,
               "visionr1 report output": report.stdout + report.stderr}
    for file in (tmp_path / "runs").rglob("*"):
        if file.is_file():
            outputs[str(file.relative_to(tmp_path))] = file.read_text(errors="replace")
    leaks = {name: planted_in(text) for name, text in outputs.items() if planted_in(text)}
    assert leaks == {}, leaks
    assert run.returncode != 0, run.stdout + run.stderr  # every request failed: the stage fails
    summaries = [name for name in outputs if name.endswith(".summary.json")]
    metrics = [name for name in outputs if name.endswith("metrics.jsonl")]
    reports = [name for name in outputs if name.endswith(".html")]
    assert summaries and metrics, sorted(outputs)  # the stage did write them: they were searched
    # The summary says why, in the trainer's words, without the key.
    summary = json.loads(outputs[summaries[0]])
    assert "openai_http_401" in summary.get("error", ""), summary
    assert reports or "nothing to report" in outputs["visionr1 report output"].lower() or report.returncode, \
        outputs["visionr1 report output"]


def test_storage_and_data_errors_are_redacted_when_made(monkeypatch):
    from visionr1_trainer.data.sources import DataSourceError
    from visionr1_trainer.storage import StorageError

    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    for error in (StorageError, DataSourceError):
        message = str(error(f"reading s3://b/k failed via https://u:pw@minio:9000 with "
                            f"{PLANTED['AWS_SECRET_ACCESS_KEY']} and X-Amz-Signature=abc123def"))
        assert planted_in(message) == [] and "u:pw" not in message and "abc123def" not in message, message


def test_a_bad_config_writes_the_termination_message_without_secrets(tmp_path, monkeypatch):
    """Exit 2 used to leave no summary: the status said only "exit code 2"."""
    from visionr1_trainer.__main__ import main

    summary = tmp_path / "termination.json"
    config = {"kind": "bridge", "run": "r", "stage": "bridge", "outputUri": "file:///x",
              "terminationMessagePath": str(summary), "storage": {"uri": "file:///x"},
              "model": {"name": "m"}, "source": {"source": "file:///x.jsonl"},
              "bridge": {"multimodalModel": {"backend": "nope"}, "reasoningModel": {"backend": "rule"}}}
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(config))
    assert main(["bridge", "--config", str(path)]) == 2
    written = json.loads(summary.read_text())
    assert written["stage"] == "bridge" and "multimodalModel.backend" in written["error"], written
