"""visionr1_trainer.storage against all three schemes.

s3:// runs against a real S3-compatible HTTP endpoint (moto in server mode on 127.0.0.1),
so requests, multipart uploads, pagination and error responses go over the wire the way
they do against MinIO or AWS. The interruption tests kill a real process with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from visionr1_trainer.storage import (
    COMMIT_MARKER,
    LocalStore,
    S3Store,
    Store,
    StorageError,
    StorageURI,
    join_uri,
    open_store,
    parse_uri,
)

SCHEMES = ["file", "pvc", "s3"]


# --- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Fake credentials, and nothing from the developer's own AWS setup leaking in."""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_RETRY_MODE", "VISIONR1_PVC_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail fast: no backoff in error tests


@dataclass
class Target:
    """Where a test's store lives, in a form a subprocess can reopen."""

    scheme: str
    uri: str
    kwargs: dict = field(default_factory=dict)
    endpoint: str = ""
    bucket: str = ""

    def open(self) -> Store:
        return open_store(self.uri, **self.kwargs)

    def s3(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


@pytest.fixture(params=SCHEMES)
def target(request, tmp_path) -> Target:
    if request.param == "file":
        return Target("file", f"file://{tmp_path}/store")
    if request.param == "pvc":
        (tmp_path / "pvcs" / "data").mkdir(parents=True)  # what kubelet's mount provides
        return Target("pvc", "pvc://data/runs/r1", {"pvc_root": str(tmp_path / "pvcs")})
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"t-{uuid.uuid4().hex[:16]}"  # one bucket per test: no state shared
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return Target("s3", f"s3://{bucket}/runs/r1", {"endpoint_url": endpoint}, endpoint, bucket)


@pytest.fixture
def store(target) -> Store:
    return target.open()


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


CKPT = {"model.safetensors": b"w" * 1000, "config.json": b"{}", "optim/rank0.pt": b"o" * 10}


# --- round trip ---------------------------------------------------------------------


def test_commit_list_fetch_round_trip(store, tmp_path):
    src = make_tree(tmp_path / "src", CKPT)
    for step in (10, 2, 1):
        uri = store.commit_dir(src, f"checkpoints/checkpoint-{step}", metadata={"step": step})
        assert uri == join_uri(store.uri, f"checkpoints/checkpoint-{step}")

    names = ["checkpoints/checkpoint-1", "checkpoints/checkpoint-2", "checkpoints/checkpoint-10"]
    assert store.list_committed("checkpoints") == names  # natural order, not 1, 10, 2
    assert store.list_committed("checkpoints/") == names
    assert store.latest_committed("checkpoints") == "checkpoints/checkpoint-10"
    assert store.list_committed() == []  # "checkpoints" itself is not an artifact
    assert store.latest_committed("nothing-here") is None
    assert store.is_committed("checkpoints/checkpoint-2")
    assert not store.is_committed("checkpoints/checkpoint-3")

    manifest = store.read_manifest("checkpoints/checkpoint-10")
    assert manifest["name"] == "checkpoints/checkpoint-10"
    assert manifest["metadata"] == {"step": 10}
    assert manifest["committed_at"].endswith("Z")
    assert [f["path"] for f in manifest["files"]] == sorted(CKPT)
    assert {f["path"]: f["size"] for f in manifest["files"]} == {k: len(v) for k, v in CKPT.items()}

    out = store.fetch_dir("checkpoints/checkpoint-10", tmp_path / "out")
    assert read_tree(out) == CKPT  # the marker is not copied
    assert store.open_file("checkpoints/checkpoint-2", "optim/rank0.pt") == CKPT["optim/rank0.pt"]
    with pytest.raises(StorageError, match="no file"):
        store.open_file("checkpoints/checkpoint-2", "missing.bin")


def test_commit_file_and_json(store, tmp_path):
    (tmp_path / "summary.json").write_text('{"acc": 0.5}')
    store.commit_file(tmp_path / "summary.json", "eval/mathvista", metadata={"n": 3})
    assert store.open_file("eval/mathvista", "summary.json") == b'{"acc": 0.5}'
    assert store.list_committed("eval") == ["eval/mathvista"]

    assert store.get_json("status.json", default=None) is None
    with pytest.raises(StorageError, match="status.json"):
        store.get_json("status.json")
    store.put_json("status.json", {"phase": "sft", "step": 1})
    store.put_json("status.json", {"phase": "grpo", "step": 2})  # overwrite in place
    assert store.get_json("status.json") == {"phase": "grpo", "step": 2}
    assert store.put_json("stages/sft/summary.json", [1, 2]).endswith("/stages/sft/summary.json")
    assert store.get_json("stages/sft/summary.json") == [1, 2]
    assert store.list_committed() == []  # JSON keys and plain prefixes are not artifacts


def test_recommit_replaces_content_cleanly(store, tmp_path):
    store.commit_dir(make_tree(tmp_path / "v1", {"a.bin": b"1", "sub/b.bin": b"2"}), "dataset")
    store.commit_dir(make_tree(tmp_path / "v2", {"c.bin": b"3"}), "dataset", {"v": 2})
    assert [f["path"] for f in store.read_manifest("dataset")["files"]] == ["c.bin"]
    assert store.read_manifest("dataset")["metadata"] == {"v": 2}
    assert read_tree(store.fetch_dir("dataset", tmp_path / "out")) == {"c.bin": b"3"}
    with pytest.raises(StorageError):
        store.open_file("dataset", "a.bin")


def test_delete_makes_artifact_invisible(store, tmp_path):
    src = make_tree(tmp_path / "src", CKPT)
    store.commit_dir(src, "ckpt/checkpoint-1")
    store.commit_dir(src, "ckpt/checkpoint-2")
    store.delete("ckpt/checkpoint-2")
    store.delete("ckpt/checkpoint-2")  # idempotent: a retried cleanup must not fail
    assert store.list_committed("ckpt") == ["ckpt/checkpoint-1"]
    assert not store.is_committed("ckpt/checkpoint-2")
    with pytest.raises(StorageError, match="not committed"):
        store.fetch_dir("ckpt/checkpoint-2", tmp_path / "out")


def test_uncommitted_reads_fail(store, tmp_path):
    for read in (lambda: store.read_manifest("nope"),
                 lambda: store.fetch_dir("nope", tmp_path / "o"),
                 lambda: store.open_file("nope", "x")):
        with pytest.raises(StorageError, match="nope.*not committed"):
            read()


def test_bad_commits_write_nothing(store, tmp_path):
    with pytest.raises(StorageError, match="not JSON"):
        store.commit_dir(make_tree(tmp_path / "s", CKPT), "a", metadata={"bad": object()})
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="no files"):
        store.commit_dir(tmp_path / "empty", "b")
    with pytest.raises(StorageError, match="not a directory"):
        store.commit_dir(tmp_path / "missing", "c")
    for bad in ("", "/abs", "../up", "a/../b", "x.partial-1"):
        with pytest.raises(StorageError):
            store.commit_dir(tmp_path / "s", bad)
    assert store.list_committed() == []


def test_fetch_detects_corruption(target, store, tmp_path):
    store.commit_dir(make_tree(tmp_path / "src", CKPT), "ckpt")
    bad = b"x" * len(CKPT["config.json"])  # same size: only the sha256 can tell
    if target.scheme == "s3":
        target.s3().put_object(Bucket=target.bucket, Key="runs/r1/ckpt/config.json", Body=bad)
    else:
        (store.root / "ckpt" / "config.json").write_bytes(bad)
    with pytest.raises(StorageError, match="corrupt"):
        store.fetch_dir("ckpt", tmp_path / "out")
    with pytest.raises(StorageError, match="corrupt"):
        store.open_file("ckpt", "config.json")


# --- interrupted writes -------------------------------------------------------------


class Boom(RuntimeError):
    pass


def fail_after(monkeypatch, store: Store, n_files: int) -> None:
    """Make the store's per-file copy/upload raise once n_files have been written."""
    original, calls = type(store)._put_file, []

    def put(self, *args):
        if len(calls) >= n_files:
            raise Boom("simulated crash mid-commit")
        calls.append(args)
        original(self, *args)

    monkeypatch.setattr(type(store), "_put_file", put)


def test_interrupted_commit_is_invisible_and_retry_succeeds(store, tmp_path, monkeypatch):
    fail_after(monkeypatch, store, 2)
    with pytest.raises(Boom):
        store.commit_dir(make_tree(tmp_path / "v1", CKPT), "ckpt/checkpoint-5")
    assert not store.is_committed("ckpt/checkpoint-5")
    assert store.list_committed("ckpt") == []
    with pytest.raises(StorageError, match="not committed"):
        store.fetch_dir("ckpt/checkpoint-5", tmp_path / "out")

    monkeypatch.undo()
    store.commit_dir(make_tree(tmp_path / "v2", {"only.bin": b"new"}), "ckpt/checkpoint-5")
    assert store.list_committed("ckpt") == ["ckpt/checkpoint-5"]
    assert read_tree(store.fetch_dir("ckpt/checkpoint-5", tmp_path / "out")) == {"only.bin": b"new"}


def test_interrupted_recommit_never_shows_a_mix(store, tmp_path, monkeypatch):
    store.commit_dir(make_tree(tmp_path / "v1", CKPT), "ckpt")
    fail_after(monkeypatch, store, 1)
    with pytest.raises(Boom):
        store.commit_dir(make_tree(tmp_path / "v2", {"a": b"1", "b": b"2"}), "ckpt")
    # The old version may or may not survive, but what is visible must be whole.
    if store.is_committed("ckpt"):
        assert read_tree(store.fetch_dir("ckpt", tmp_path / "out")) == CKPT
    if isinstance(store, S3Store):
        assert not store.is_committed("ckpt")  # S3 drops the old marker before uploading


# Commits a directory from a child process that SIGKILLs itself after one file: no
# finally blocks, no atexit, no boto3 abort; exactly what an OOM kill leaves behind.
SELF_KILL = """
import os, signal, sys, json
from visionr1_trainer.storage import open_store
uri, kwargs, src = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
store = open_store(uri, **kwargs)
original = type(store)._put_file
calls = []
def put(self, *args):
    if calls:
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(args)
    original(self, *args)
type(store)._put_file = put
store.commit_dir(src, "ckpt/checkpoint-7")
"""


def test_sigkill_mid_commit_leaves_nothing_visible(target, store, tmp_path):
    src = make_tree(tmp_path / "src", CKPT)
    proc = subprocess.run([sys.executable, "-c", SELF_KILL, target.uri, json.dumps(target.kwargs),
                           str(src)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not store.is_committed("ckpt/checkpoint-7")
    assert store.list_committed("ckpt") == []
    if isinstance(store, LocalStore):  # the partial dir is there, just never listed
        assert [p.name.split(".partial-")[0] for p in (store.root / "ckpt").iterdir()] == [
            "checkpoint-7"]

    store.commit_dir(make_tree(tmp_path / "v2", {"x": b"1"}), "ckpt/checkpoint-7")
    assert read_tree(store.fetch_dir("ckpt/checkpoint-7", tmp_path / "o")) == {"x": b"1"}
    if isinstance(store, LocalStore):  # the retry garbage-collects the killed attempt
        assert [p.name for p in (store.root / "ckpt").iterdir()] == ["checkpoint-7"]


# A plain commit with a small multipart threshold: 30 MB goes up as six 5 MB parts.
MULTIPART_COMMIT = """
import sys
from boto3.s3.transfer import TransferConfig
from visionr1_trainer.storage import S3Store
endpoint, bucket, src = sys.argv[1:4]
cfg = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20, max_concurrency=1)
store = S3Store(bucket, "runs/r1", f"s3://{bucket}/runs/r1", endpoint_url=endpoint,
                transfer_config=cfg)
store.commit_dir(src, "ckpt/checkpoint-9")
"""


@pytest.mark.parametrize("target", ["s3"], indirect=True)
def test_s3_sigkill_during_multipart_upload(target, store, tmp_path):
    src = make_tree(tmp_path / "src", {"config.json": b"{}", "model.bin": b"\1" * (30 << 20)})
    s3 = target.s3()
    proc = subprocess.Popen([sys.executable, "-c", MULTIPART_COMMIT, target.endpoint,
                             target.bucket, str(src)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        # Kill as soon as the big file's multipart upload has started: its parts are on
        # the server, the marker cannot be (it is written after the upload completes).
        while not s3.list_multipart_uploads(Bucket=target.bucket).get("Uploads"):
            assert proc.poll() is None, f"commit ended before the kill: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "multipart upload never started"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=target.bucket).get("Contents", [])]
    assert "runs/r1/ckpt/checkpoint-9/config.json" in keys  # a real partial write...
    assert f"runs/r1/ckpt/checkpoint-9/{COMMIT_MARKER}" not in keys
    assert not store.is_committed("ckpt/checkpoint-9")  # ...that no reader sees
    assert store.list_committed("ckpt") == []

    store.commit_dir(make_tree(tmp_path / "v2", {"model.bin": b"2"}), "ckpt/checkpoint-9")
    assert store.list_committed("ckpt") == ["ckpt/checkpoint-9"]
    assert not s3.list_multipart_uploads(Bucket=target.bucket).get("Uploads")  # aborted


# --- URIs ---------------------------------------------------------------------------


@pytest.mark.parametrize("uri, parsed", [
    ("file:///abs/path", StorageURI("file", "", "/abs/path")),
    ("file:///abs//path/./x/", StorageURI("file", "", "/abs/path/x")),
    ("file://./relative", StorageURI("file", "", "relative")),
    ("file://relative/dir", StorageURI("file", "", "relative/dir")),
    ("file://.", StorageURI("file", "", "")),
    ("s3://bucket", StorageURI("s3", "bucket", "")),
    ("s3://my.bucket-1/prefix/run/", StorageURI("s3", "my.bucket-1", "prefix/run")),
    ("s3://bucket//a//b", StorageURI("s3", "bucket", "a/b")),
    ("pvc://visionr1-data/sub/path", StorageURI("pvc", "visionr1-data", "sub/path")),
    ("pvc://claim", StorageURI("pvc", "claim", "")),
])
def test_parse_uri_good(uri, parsed):
    assert parse_uri(uri) == parsed
    assert parse_uri(str(parsed)) == parsed  # str() round-trips


@pytest.mark.parametrize("uri", [
    "", "   ", "/abs/path", "relative", "http://host/x", "gs://bucket/x", "S3://bucket",
    "file://", "file:///a/../b", "s3://", "s3:///key", "s3://bad bucket/x", "s3://b@d/x",
    "s3://b/../x",
    "pvc://", "pvc:///sub", "pvc://Claim/x", "pvc://claim/a/../../etc", "s3://bucket/a\\b",
])
def test_parse_uri_bad(uri):
    with pytest.raises(StorageError) as err:
        parse_uri(uri)
    # The message names the URI, redacted: "s3://b@d/x" has the shape of user-info.
    from visionr1_trainer.redact import redact

    assert redact(repr(uri)) in str(err.value)


@pytest.mark.parametrize("base, parts, joined", [
    ("s3://b/p", ("a", "b/"), "s3://b/p/a/b"),
    ("s3://bkt", ("a/b", "c"), "s3://bkt/a/b/c"),
    ("s3://bkt/p/", ("/x",), "s3://bkt/p/x"),
    ("file:///data", ("ckpt", "checkpoint-1"), "file:///data/ckpt/checkpoint-1"),
    ("file:///", ("x",), "file:///x"),
    ("file://rel", ("x",), "file://rel/x"),
    ("pvc://claim", ("a",), "pvc://claim/a"),
    ("pvc://claim/sub", (), "pvc://claim/sub"),
])
def test_join_uri_good(base, parts, joined):
    assert join_uri(base, *parts) == joined


@pytest.mark.parametrize("parts", [("",), ("/",), ("..",), ("a/../b",), ("ok", "a/..")])
def test_join_uri_bad(parts):
    with pytest.raises(StorageError) as err:
        join_uri("s3://b/p", *parts)
    assert "s3://b/p" in str(err.value)


# --- configuration and errors -------------------------------------------------------


def test_open_store_reads_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    s3 = open_store("s3://bucket/p")
    assert (s3.endpoint_url, s3.region, s3.bucket, s3.prefix) == (
        "http://minio:9000", "eu-west-1", "bucket", "p")
    assert s3._client is None  # no client (and no credential lookup) until first use
    assert open_store("s3://b", endpoint_url="http://x", region="r").endpoint_url == "http://x"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert open_store("s3://b").region == "ap-south-1"

    monkeypatch.setenv("VISIONR1_PVC_ROOT", str(tmp_path))
    assert open_store("pvc://claim/a/b").root == tmp_path / "claim" / "a" / "b"
    assert open_store("pvc://claim", pvc_root="/elsewhere").root == Path("/elsewhere/claim")
    monkeypatch.delenv("VISIONR1_PVC_ROOT")
    assert open_store("pvc://claim").root == Path("/mnt/visionr1/pvc/claim")

    monkeypatch.chdir(tmp_path)
    local = open_store("file://./out")
    assert local.root == tmp_path / "out" and local.uri == f"file://{tmp_path}/out"


def test_unmounted_pvc_is_an_error(tmp_path):
    store = open_store("pvc://not-mounted/runs", pvc_root=str(tmp_path))
    with pytest.raises(StorageError, match="not mounted"):
        store.commit_file(__file__, "x")
    with pytest.raises(StorageError, match="not mounted"):
        store.put_json("status.json", {})
    assert not (tmp_path / "not-mounted").exists()


def test_local_path_reads_in_place(tmp_path):
    store = open_store(f"file://{tmp_path}")
    store.commit_dir(make_tree(tmp_path / "src", CKPT), "ds")
    in_place = read_tree(store.local_path("ds"))
    assert in_place.pop(COMMIT_MARKER) and in_place == CKPT
    with pytest.raises(StorageError, match="not committed"):
        store.local_path("other")


def test_s3_missing_bucket_is_a_storage_error(s3_endpoint, tmp_path):
    store = open_store("s3://no-such-bucket/p", endpoint_url=s3_endpoint)
    src = make_tree(tmp_path / "src", {"a": b"1"})
    calls = [store.list_committed, lambda: store.is_committed("a"),
             lambda: store.commit_dir(src, "a"), lambda: store.get_json("s.json", default={}),
             lambda: store.put_json("s.json", {})]
    for call in calls:
        with pytest.raises(StorageError, match="s3://no-such-bucket/p.*NoSuchBucket"):
            call()


def test_s3_missing_credentials_is_a_storage_error(s3_endpoint, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="s3://bucket/p.*credentials"):
        open_store("s3://bucket/p", endpoint_url=s3_endpoint).list_committed()


def test_s3_unreachable_endpoint_is_a_storage_error(tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = open_store("s3://bucket/p", endpoint_url=f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"s3://bucket/p.*127.0.0.1:{port}"):
        store.latest_committed()
    with pytest.raises(StorageError, match="s3://bucket/p/x"):
        store.commit_file(__file__, "x")
    assert time.monotonic() - started < 10
