"""Artifact storage for every stage: ``file://``, ``pvc://`` and ``s3://`` behind one API.

An artifact is a directory of files (a dataset, ``checkpoints/checkpoint-00000010``, an
eval summary). It becomes visible only when its commit marker ``_COMMITTED.json`` is
written, and the marker is always written LAST, after every file is durably stored.
Readers list, fetch and open committed artifacts only. So a pod killed mid-upload (OOM,
preemption, node drain) leaves nothing a reader can mistake for data: a half-written
checkpoint is never read, and a restarted stage resumes from its last committed one.

Re-committing a name (the retry after a crash) first removes the old marker, so readers
see "not committed" rather than a mix of old and new files, and the new manifest lists
only the files of the new commit. The manifest, not a directory listing, is what readers
trust: ``{"name", "files": [{"path", "size", "sha256"}], "metadata", "committed_at"}``.
Artifacts own their whole prefix: do not nest one artifact inside another, and let one
writer at a time commit a given name (each stage owns its outputs).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

COMMIT_MARKER = "_COMMITTED.json"
PARTIAL_TAG = ".partial-"  # local in-progress dirs: <name>.partial-<uuid>, never listed
DEFAULT_PVC_ROOT = "/mnt/visionr1/pvc"
SCHEMES = ("file", "s3", "pvc")
_MISSING: Any = object()
# Loose on purpose: legacy buckets and S3-compatible stores allow more than AWS rules.
_S3_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,254}$")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # a PVC name (DNS-1123)


class StorageError(Exception):
    """Any storage failure a user can act on; the message names the URI and the problem.

    The message is redacted when the error is made: storage errors are the ones most
    likely to carry an endpoint, a signed URL or a key, and they reach the termination
    message, the run's status, Events and the report.
    """

    def __init__(self, message: object = "") -> None:
        from .redact import redact

        super().__init__(redact(message))


# --- URIs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageURI:
    """A parsed, normalised URI; ``str()`` gives it back in canonical form."""

    scheme: str  # "file" | "s3" | "pvc"
    netloc: str  # bucket or claim; "" for file
    path: str  # normalised: no "." / empty segments; leading "/" only for absolute file paths

    def __str__(self) -> str:
        if self.scheme == "file":
            return "file://" + (self.path or ".")
        return f"{self.scheme}://{self.netloc}" + (f"/{self.path}" if self.path else "")


def _segments(path: str, where: str) -> list[str]:
    """Split a relative path into clean segments; ``..`` could escape the root, so reject it."""
    if "\\" in path or "\x00" in path:
        raise StorageError(f"{where}: backslashes and NUL are not allowed in {path!r}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StorageError(f"{where}: '..' segments are not allowed in {path!r}")
    return parts


def parse_uri(uri: str) -> StorageURI:
    """Parse and normalise a storage URI; raise StorageError naming the URI if it is bad."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"storage URI is empty: {uri!r}")
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in SCHEMES:
        raise StorageError(f"storage URI {uri!r} must start with one of "
                           + ", ".join(f"{s}://" for s in SCHEMES))
    if scheme == "file":
        if not rest:
            raise StorageError(f"storage URI {uri!r} has no path (use file://. for the cwd)")
        lead = "/" if rest.startswith("/") else ""
        return StorageURI("file", "", lead + "/".join(_segments(rest, f"storage URI {uri!r}")))
    netloc, _, path = rest.partition("/")
    if scheme == "s3" and not _S3_BUCKET.match(netloc):
        raise StorageError(f"storage URI {uri!r}: {netloc!r} is not a valid S3 bucket name")
    if scheme == "pvc" and not _K8S_NAME.match(netloc):
        raise StorageError(f"storage URI {uri!r}: {netloc!r} is not a valid PVC claim name")
    return StorageURI(scheme, netloc, "/".join(_segments(path, f"storage URI {uri!r}")))


def _clean_name(name: str, what: str = "artifact name") -> str:
    """A relative key under a store root: non-empty, no '..', no reserved partial tag."""
    if not isinstance(name, str) or not name.strip("/ "):
        raise StorageError(f"{what} must be a non-empty relative path, got {name!r}")
    if name.startswith("/"):
        raise StorageError(f"{what} must be relative, got {name!r}")
    parts = _segments(name, what)
    if not parts or any(PARTIAL_TAG in p for p in parts):
        raise StorageError(f"{what} {name!r} is empty or contains the reserved {PARTIAL_TAG!r}")
    return "/".join(parts)


def join_uri(base: str, *parts: str) -> str:
    """``join_uri("s3://b/p", "a", "b/") == "s3://b/p/a/b"``; rejects empty or '..' parts."""
    root = parse_uri(base)
    extra = [_clean_name(p.lstrip("/"), f"path part for {base!r}") for p in parts]
    path = "/".join(p for p in (root.path.rstrip("/"), *extra) if p)
    if root.path.startswith("/") and not path.startswith("/"):
        path = "/" + path  # file:/// root joined with parts
    return str(StorageURI(root.scheme, root.netloc, path))


def natural_key(name: str) -> list[Any]:
    """Sort key so that checkpoint-2 < checkpoint-10 (digit runs compare as numbers)."""
    # re.split with a group alternates text, digits, text... so positions never mix types.
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", name))]


# --- manifests ----------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_of(local_dir: Path) -> list[tuple[str, Path]]:
    """(relative posix path, file) for every file under local_dir, sorted."""
    if not local_dir.is_dir():
        raise StorageError(f"cannot commit {str(local_dir)!r}: not a directory")
    files = sorted((p.relative_to(local_dir).as_posix(), p) for p in local_dir.rglob("*")
                   if p.is_file())
    # A directory that is itself a committed artifact (LocalStore.local_path) carries a
    # marker; copying it would make the new artifact look committed before its files exist.
    files = [(rel, p) for rel, p in files if rel != COMMIT_MARKER]
    if not files:
        raise StorageError(f"cannot commit {str(local_dir)!r}: it contains no files")
    return files


def build_manifest(name: str, files: list[tuple[str, Path]], metadata: dict | None) -> bytes:
    """The marker's bytes; computed before any upload so bad metadata fails early."""
    manifest = {
        "name": name,
        "files": [{"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)}
                  for rel, p in files],
        "metadata": metadata or {},
        "committed_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        return json.dumps(manifest, indent=2, sort_keys=True).encode()
    except (TypeError, ValueError) as e:
        raise StorageError(f"metadata for artifact {name!r} is not JSON-serialisable: {e}") from e


def _loads(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as e:
        raise StorageError(f"{where} is not valid JSON: {e}") from e


# --- the store interface ------------------------------------------------------------


class Store(ABC):
    """A root URI under which artifacts are committed and small JSON objects are kept."""

    uri: str

    def commit_dir(self, local_dir: str | Path, name: str, metadata: dict | None = None) -> str:
        """Store every file under local_dir as artifact ``name``; marker last. Returns its URI."""
        return self._commit_files(name, _files_of(Path(local_dir)), metadata)

    def commit_file(self, local_file: str | Path, name: str, metadata: dict | None = None) -> str:
        """A one-file artifact; the file keeps its base name inside the artifact."""
        path = Path(local_file)
        if not path.is_file():
            raise StorageError(f"cannot commit {str(path)!r}: not a file")
        return self._commit_files(name, [(path.name, path)], metadata)

    def _commit_files(self, name: str, files: list[tuple[str, Path]], metadata: dict | None) -> str:
        name = _clean_name(name)
        self._commit(name, files, build_manifest(name, files, metadata))
        return join_uri(self.uri, name)

    def read_manifest(self, name: str) -> dict:
        name = _clean_name(name)
        data = self._read_marker(name)
        if data is None:
            raise StorageError(f"{join_uri(self.uri, name)} is not committed")
        return _loads(data, f"commit marker of {join_uri(self.uri, name)}")

    def latest_committed(self, prefix: str = "") -> str | None:
        names = self.list_committed(prefix)
        return names[-1] if names else None

    def open_file(self, name: str, relpath: str) -> bytes:
        """One file of a committed artifact, checked against the manifest."""
        rel, where = _clean_name(relpath, "file path"), join_uri(self.uri, name, relpath)
        entry = next((e for e in self._manifest_files(name) if e["path"] == rel), None)
        if entry is None:
            raise StorageError(f"{join_uri(self.uri, name)} has no file {relpath!r}")
        data = self._read_object(f"{_clean_name(name)}/{rel}", where)
        if data is None:
            raise StorageError(f"{where} is listed in the manifest but missing")
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StorageError(f"{where} is corrupt: size or sha256 differs from the manifest")
        return data

    def fetch_dir(self, name: str, local_dir: str | Path) -> Path:
        """Copy a committed artifact into local_dir (created if needed; other files there are
        left alone), checking every file's size and sha256 against the manifest."""
        out = Path(local_dir)
        for entry in self._manifest_files(name):
            dst, where = out / entry["path"], join_uri(self.uri, name, entry["path"])
            dst.parent.mkdir(parents=True, exist_ok=True)
            self._get_file(f"{_clean_name(name)}/{entry['path']}", dst, where)
            if dst.stat().st_size != entry["size"] or sha256_file(dst) != entry["sha256"]:
                raise StorageError(f"{where} is corrupt: size or sha256 differs from the manifest")
        return out

    def put_json(self, key: str, obj: Any) -> str:
        """A small object that is atomic on its own (status, summaries); no marker needed."""
        key = _clean_name(key, "key")
        self._write_object(key, json.dumps(obj, indent=2, sort_keys=True).encode())
        return join_uri(self.uri, key)

    def get_json(self, key: str, default: Any = _MISSING) -> Any:
        key = _clean_name(key, "key")
        data = self._read_object(key, join_uri(self.uri, key))
        if data is None:
            if default is _MISSING:
                raise StorageError(f"{join_uri(self.uri, key)} does not exist")
            return default
        return _loads(data, join_uri(self.uri, key))

    def _read_marker(self, name: str) -> bytes | None:
        return self._read_object(f"{name}/{COMMIT_MARKER}", join_uri(self.uri, name))

    def _manifest_files(self, name: str) -> list[dict]:
        """Manifest entries, paths re-checked: a manifest must not write outside local_dir."""
        files = self.read_manifest(name)["files"]
        for entry in files:
            _clean_name(entry["path"], f"path in manifest of {join_uri(self.uri, name)}")
        return files

    # What each backend provides; the private ones receive names already cleaned.
    @abstractmethod
    def is_committed(self, name: str) -> bool: ...
    @abstractmethod
    def list_committed(self, prefix: str = "") -> list[str]: ...
    @abstractmethod
    def delete(self, name: str) -> None: ...
    @abstractmethod
    def _commit(self, name: str, files: list[tuple[str, Path]], marker: bytes) -> None: ...
    @abstractmethod
    def _read_object(self, key: str, where: str) -> bytes | None: ...  # None if missing
    @abstractmethod
    def _write_object(self, key: str, data: bytes) -> None: ...  # atomic
    @abstractmethod
    def _get_file(self, key: str, dst: Path, where: str) -> None: ...


# --- local filesystem (file://, pvc://) ---------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Make a rename or create in ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some NFS/FUSE volumes behind PVCs refuse fsync on a dir; rename is still atomic


def _atomic_write(path: Path, data: bytes) -> None:
    """tmp file + fsync + os.replace: a reader sees the old bytes or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _copy_durable(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


class LocalStore(Store):
    """file:// and pvc://: an artifact is a directory under ``root``."""

    def __init__(self, root: Path, uri: str, mount: Path | None = None) -> None:
        self.root, self.uri, self.mount = root, uri, mount

    def local_path(self, name: str) -> Path:
        """A committed artifact's directory, for reading in place without a copy."""
        if not self.is_committed(name):
            raise StorageError(f"{join_uri(self.uri, name)} is not committed")
        return self.root / _clean_name(name)

    def is_committed(self, name: str) -> bool:
        return (self.root / _clean_name(name) / COMMIT_MARKER).is_file()

    def list_committed(self, prefix: str = "") -> list[str]:
        prefix = "/".join(_segments(prefix, "prefix"))
        base = self.root / prefix
        if not base.is_dir():
            return []
        names = [f"{prefix}/{d.name}" if prefix else d.name for d in base.iterdir()
                 if PARTIAL_TAG not in d.name and (d / COMMIT_MARKER).is_file()]
        return sorted(names, key=natural_key)

    def delete(self, name: str) -> None:
        """Marker first, so the artifact turns invisible before its files go."""
        path = self.root / _clean_name(name)
        if not path.is_dir():
            return
        (path / COMMIT_MARKER).unlink(missing_ok=True)
        _fsync_dir(path)
        shutil.rmtree(path)

    def _check_mounted(self) -> None:
        # An unmounted PVC would otherwise be created as a plain dir in the container's
        # writable layer, and every "committed" checkpoint would vanish with the pod.
        if self.mount is not None and not self.mount.is_dir():
            raise StorageError(f"{self.uri}: PVC is not mounted at {self.mount} "
                               "(check the pod's volumeMounts or VISIONR1_PVC_ROOT)")

    def _put_file(self, src: Path, dst: Path) -> None:
        _copy_durable(src, dst)

    def _commit(self, name: str, files: list[tuple[str, Path]], marker: bytes) -> None:
        self._check_mounted()
        dest = self.root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f"{dest.name}{PARTIAL_TAG}{uuid.uuid4().hex}")
        try:
            for rel, src in files:
                self._put_file(src, partial / rel)
            for d in sorted({(partial / rel).parent for rel, _ in files}, reverse=True):
                _fsync_dir(d)
            self.delete(name)  # old marker first: readers never see old and new mixed
            os.rename(partial, dest)
            _fsync_dir(dest.parent)
            _atomic_write(dest / COMMIT_MARKER, marker)
        except OSError as e:
            raise StorageError(f"committing {join_uri(self.uri, name)} failed: {e}") from e
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # already gone after a good rename
        for stale in dest.parent.glob(f"{glob.escape(dest.name)}{PARTIAL_TAG}*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by an earlier, killed attempt

    def _read_object(self, key: str, where: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise StorageError(f"reading {where} failed: {e}") from e

    def _write_object(self, key: str, data: bytes) -> None:
        self._check_mounted()
        try:
            (self.root / key).parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.root / key, data)
        except OSError as e:
            raise StorageError(f"writing {join_uri(self.uri, key)} failed: {e}") from e

    def _get_file(self, key: str, dst: Path, where: str) -> None:
        if not (self.root / key).is_file():
            raise StorageError(f"{where} is listed in the manifest but missing")
        _copy_durable(self.root / key, dst)


# --- S3 and S3-compatible stores ----------------------------------------------------

_S3_HINTS = {
    "NoSuchBucket": " (does the bucket exist at this endpoint?)",
    "AccessDenied": " (check the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY Secret and its policy)",
    "InvalidAccessKeyId": " (check the AWS_ACCESS_KEY_ID Secret)",
    "SignatureDoesNotMatch": " (check the AWS_SECRET_ACCESS_KEY Secret)",
}


def _s3_client(endpoint_url: str | None, region: str) -> Any:
    import boto3  # imported here: the operator imports this module without boto3
    from botocore.config import Config

    retries: dict[str, Any] = {"mode": os.environ.get("AWS_RETRY_MODE", "standard")}
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["total_max_attempts"] = 8  # S3-compatible stores answer bursts with 503 SlowDown
    config = Config(retries=retries, connect_timeout=10, read_timeout=120,
                    # MinIO/Ceph endpoints rarely have wildcard DNS for virtual-host buckets
                    s3={"addressing_style": "path"} if endpoint_url else None)
    # A session of its own: boto3's default session caches the credentials it first found,
    # so a store opened after the env changed (a rotated Secret, a test) would use stale ones.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region,
                                          config=config)


class S3Store(Store):
    """s3://bucket/prefix: artifacts are key prefixes; the marker object is PUT last."""

    def __init__(self, bucket: str, prefix: str, uri: str, *, endpoint_url: str | None = None,
                 region: str = "us-east-1", transfer_config: Any = None) -> None:
        self.bucket, self.prefix, self.uri = bucket, prefix, uri
        self.endpoint_url, self.region = endpoint_url, region
        self.transfer_config = transfer_config
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:  # lazily: building a store must not need credentials
            self._client = _s3_client(self.endpoint_url, self.region)
        return self._client

    @contextmanager
    def _errors(self, action: str, where: str) -> Iterator[None]:
        """Turn botocore/boto3 failures into a StorageError that names the URI."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as e:
            err = e.response.get("Error", {})
            code = err.get("Code", "?")
            raise StorageError(f"{action} {where} failed: {code} {err.get('Message', '')}"
                               f"{_S3_HINTS.get(code, '')}") from e
        except (BotoCoreError, Boto3Error) as e:
            endpoint = self.endpoint_url or "the AWS default endpoint"
            raise StorageError(f"{action} {where} failed via {endpoint}: {e}") from e

    def _key(self, name: str) -> str:
        return "/".join(p for p in (self.prefix, name) if p)

    def _exists(self, key: str, where: str) -> bool:
        # LIST, not HEAD: a HEAD on a missing bucket is a bare 404, indistinguishable from
        # "not committed"; LIST says NoSuchBucket.
        with self._errors("checking", where):
            resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1)
        return any(obj["Key"] == key for obj in resp.get("Contents", []))

    def is_committed(self, name: str) -> bool:
        name = _clean_name(name)
        return self._exists(self._key(f"{name}/{COMMIT_MARKER}"), join_uri(self.uri, name))

    def list_committed(self, prefix: str = "") -> list[str]:
        prefix = "/".join(_segments(prefix, "prefix"))
        base = self._key(prefix)
        base = f"{base}/" if base else ""
        where = join_uri(self.uri, prefix) if prefix else self.uri
        names = []
        with self._errors("listing", where):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base, Delimiter="/")
            children = [cp["Prefix"] for page in pages for cp in page.get("CommonPrefixes", [])]
        for child in children:
            if self._exists(child + COMMIT_MARKER, where):
                names.append("/".join(p for p in (prefix, child[len(base):-1]) if p))
        return sorted(names, key=natural_key)

    def delete(self, name: str) -> None:
        """Marker first (invisible at once), then files and unfinished multipart uploads."""
        name = _clean_name(name)
        key, where = self._key(name), join_uri(self.uri, name)
        with self._errors("deleting", where):
            self.client.delete_object(Bucket=self.bucket, Key=f"{key}/{COMMIT_MARKER}")
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{key}/")
            for page in pages:
                batch = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if batch:  # a page holds at most 1000 keys, the delete_objects limit
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
            # A killed multipart upload keeps its parts (and bills for them) until aborted.
            uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=f"{key}/")
            for up in uploads.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"],
                                                   UploadId=up["UploadId"])

    def _transfer(self) -> Any:
        if self.transfer_config is None:
            from boto3.s3.transfer import TransferConfig

            self.transfer_config = TransferConfig(multipart_threshold=64 << 20,
                                                  multipart_chunksize=64 << 20)
        return self.transfer_config

    def _put_file(self, src: Path, key: str, where: str) -> None:
        with self._errors("uploading", where):
            self.client.upload_file(str(src), self.bucket, key, Config=self._transfer())

    def _commit(self, name: str, files: list[tuple[str, Path]], marker: bytes) -> None:
        key = self._key(name)
        self.delete(name)  # old marker, then leftovers of an earlier (failed) attempt
        for rel, src in files:
            self._put_file(src, f"{key}/{rel}", join_uri(self.uri, name, rel))
        self._write_object(f"{name}/{COMMIT_MARKER}", marker)  # last: this is the commit

    def _read_object(self, key: str, where: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self._errors("reading", where):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise  # NoSuchBucket, AccessDenied...: _errors names them
            return resp["Body"].read()

    def _write_object(self, key: str, data: bytes) -> None:
        with self._errors("writing", join_uri(self.uri, key)):  # one PUT is atomic on S3
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                   ContentType="application/json")

    def _get_file(self, key: str, dst: Path, where: str) -> None:
        with self._errors("downloading", where):
            self.client.download_file(self.bucket, self._key(key), str(dst),
                                      Config=self._transfer())


# --- entry point --------------------------------------------------------------------


def open_store(uri: str, *, endpoint_url: str | None = None, region: str | None = None,
               pvc_root: str | None = None) -> Store:
    """The store rooted at ``uri``. Builds no client and touches no disk until first use."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        # Absolute from here on, so artifact URIs mean the same in a process with another cwd.
        root = Path(os.path.abspath(parsed.path or "."))
        return LocalStore(root, str(StorageURI("file", "", root.as_posix())))
    if parsed.scheme == "pvc":
        base = pvc_root or os.environ.get("VISIONR1_PVC_ROOT") or DEFAULT_PVC_ROOT
        mount = Path(base) / parsed.netloc
        return LocalStore(mount / parsed.path, str(parsed), mount=mount)
    endpoint = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or None)
    region = (region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
              or "us-east-1")
    return S3Store(parsed.netloc, parsed.path, str(parsed), endpoint_url=endpoint, region=region)
