"""Where a data set's rows come from: a hub name, a local path, or a storage URI.

``DatasetRef.source`` is one of

* a hub data set name (``lmms-lab/multimodal-open-r1-8k-verified``): read with
  ``datasets.load_dataset`` (images arrive decoded, as PIL images);
* a path or ``file://`` URI (``file://./x`` is relative to the working directory) of a
  parquet, jsonl or json file, or of a directory holding such files;
* ``pvc://claim/path``: the same, on the PVC mounted under ``VISIONR1_PVC_ROOT``;
* ``s3://bucket/prefix``: a committed artifact there (fetched whole, images included),
  a stage output whose ``dataset`` artifact is used, or plain objects (downloaded).

A directory that is a stage's output (``<dir>/dataset/_COMMITTED.json``) is read through
its committed ``dataset`` artifact, so the SFT stage can be pointed at the bridge stage's
output URI. JSON and JSONL files are read line by line with the standard library rather
than through Arrow: Arrow's JSON reader rejects a whole file when one row has a field of
another type, and a broken row must be skipped and counted, not fail the stage.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .layout import LayoutError, names, select_files
from ..runtime import UnusableSetting

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
DATASET_ARTIFACT = "dataset"  # what the bridge stage commits under its output URI
COMMIT_MARKER = "_COMMITTED.json"
# Files that sit beside the data and are not rows: our artifacts' stats and marker, the
# hub's metadata (LLaMA-Factory's dataset_info.json in Vision-R1-cold), a saved data set's.
NOT_DATA = {"stats.json", COMMIT_MARKER, "dataset_info.json", "dataset_infos.json", "dataset_dict.json",
            "state.json"}
# What a hub data set's files are fetched as (``resolve(..., hub_files=True)``).
HUB_FILE_PATTERNS = ["*.parquet", "*.jsonl", "*.json", "*.zip", "README.md",
                     "**/*.parquet", "**/*.jsonl", "**/*.json", "**/*.zip"]
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


class DataSourceError(Exception):
    """A data source that cannot be read at all (as opposed to a broken row).

    Redacted when made, as ``StorageError`` is: it ends a stage and so reaches its status.
    """

    def __init__(self, message: object = "") -> None:
        from ..redact import redact

        super().__init__(redact(message))


class DataSelectionError(DataSourceError, UnusableSetting):
    """A split or subset that names no data: a retry cannot help, so the stage exits 2 (the
    operator's "unusable config" rule) instead of being retried up to its backoffLimit."""


class UnsafePath(ValueError):
    """A name from a store or a row that would resolve outside its root (``..``, absolute,
    ``//``, a symlink out): the object or row is skipped and counted, never followed."""


def inside(root: Path, relative: str) -> Path:
    """``root / relative``, resolved, if it stays inside ``root``; else ``UnsafePath``.

    Checked twice on purpose (OWASP path traversal): the name itself (no absolute path, no
    empty, ``.`` or ``..`` segment, no backslash or NUL), and the resolved path, which
    also catches a symlink inside the root that points out of it.
    """
    if (not relative or relative.startswith("/") or "\\" in relative or "\x00" in relative
            or any(part in ("", ".", "..") for part in relative.split("/"))):
        raise UnsafePath(f"{relative!r} is not a plain relative path")
    return inside_root(root, root / relative, relative)


def inside_root(root: Path, path: Path, name: str = "") -> Path:
    """``path`` resolved, if it lies under ``root`` (resolved too); else ``UnsafePath``."""
    real_root, real = root.resolve(), path.resolve()
    if real != real_root and not real.is_relative_to(real_root):
        raise UnsafePath(f"{name or str(path)!r} resolves outside {root}")
    return real


class BadRow:
    """Stands in for a row that could not even be parsed (a torn JSON line)."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where downloaded files and images decoded from rows are kept."""
    root = Path(cache_dir or os.environ.get("VISIONR1_CACHE_DIR")
                or Path(tempfile.gettempdir()) / "visionr1-cache")
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass
class ResolvedSource:
    """A source made readable: local data files, or a hub data set name."""

    description: str  # the original source, for messages
    files: list[Path] = field(default_factory=list)
    base_dir: Path | None = None  # relative image paths are resolved against this
    hub_name: str | None = None
    saved_dataset: Path | None = None  # a ``Dataset.save_to_disk`` directory
    single_file: bool = False  # the source names one file: it is read whatever the split
    # Objects of the source not fetched, by reason (``unsafe_object_key``); the readers add
    # them to the rows they skip, so nothing vanishes without a count.
    skipped: dict[str, int] = field(default_factory=dict)


def resolve(source: str, split: str = "train", storage=None, cache_dir: str | Path | None = None,
            subset: str | None = None, split_aliases: tuple[str, ...] = (), hub_files: bool = False) -> ResolvedSource:
    """Turn ``DatasetRef.source`` into local files (downloading if needed) or a hub name.

    A directory's files are chosen by ``split`` and ``subset`` as the hub chooses them
    (``layout.select_files``; ``split_aliases`` are other names of the split's files).
    ``hub_files``: a hub name is fetched as its repo's files and read as a mirror is, for
    data sets that ``datasets.load_dataset`` cannot read as one table (Vision-R1-cold's
    two JSON files, MM-Math's jsonl beside a zip of images).
    """
    pick = (split, subset, split_aliases)
    if source.startswith("s3://"):
        unsafe: list[str] = []
        local = _fetch_s3(source, storage, cache_root(cache_dir), unsafe)
        resolved = _local(source, local, *pick)
        if unsafe:
            resolved.skipped["unsafe_object_key"] = len(unsafe)
        return resolved
    if source.startswith("pvc://"):
        from ..storage import open_store

        return _local(source, Path(open_store(source).root), *pick)
    if source.startswith("file://"):
        return _local(source, Path(source[len("file://"):]), *pick)
    path = Path(source)
    if source.startswith("/") or path.exists() or path.suffix in DATA_SUFFIXES:
        return _local(source, path, *pick)
    if _HUB_NAME.match(source):
        if hub_files:
            return _local(source, _fetch_hub_files(source, cache_root(cache_dir)), *pick)
        return ResolvedSource(source, hub_name=source)
    raise DataSourceError(f"{source!r} is neither a path, a storage URI nor a hub data set name")


def _fetch_hub_files(name: str, cache: Path) -> Path:
    """The data files of hub data set ``name`` (parquet, json, jsonl, zip, README.md), downloaded."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, repo_type="dataset", allow_patterns=HUB_FILE_PATTERNS,
                                      cache_dir=str(cache / "hub")))
    except Exception as exc:  # offline, unknown name, gated: say which
        raise DataSourceError(f"cannot fetch the files of hub data set {name!r}: {type(exc).__name__}: {exc}") from exc


def _local(description: str, path: Path, split: str, subset: str | None = None,
           split_aliases: tuple[str, ...] = ()) -> ResolvedSource:
    if not path.exists():
        raise DataSourceError(f"{description}: {path} does not exist")
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise DataSourceError(f"{description}: {path.name} is not a parquet, jsonl or json file")
        if subset and not names(path, path.parent, subset):
            raise DataSelectionError(f"{description}: subset {subset!r} does not name the file {path.name}; "
                                  "point source at the folder holding the subsets, or drop subset")
        return ResolvedSource(description, [path], path.parent, single_file=True)
    if (path / DATASET_ARTIFACT / COMMIT_MARKER).is_file():
        path = path / DATASET_ARTIFACT  # a stage's output: read its committed data set
    elif (path / DATASET_ARTIFACT).is_dir():
        raise DataSourceError(f"{description}: {path / DATASET_ARTIFACT} is not committed yet "
                              "(did the bridge stage finish?)")
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return ResolvedSource(description, base_dir=path, saved_dataset=path)
    found = data_files(path)
    if not found:
        raise DataSourceError(f"{description}: no parquet, jsonl or json files under {path}")
    try:
        files = select_files(path, found, split, subset, split_aliases)
    except LayoutError as exc:
        raise DataSelectionError(f"{description}: {exc}") from None
    return ResolvedSource(description, files, path)


def data_files(directory: Path) -> list[Path]:
    """Every parquet, jsonl and json file under ``directory`` that may hold rows, sorted."""
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.suffix in DATA_SUFFIXES and p.name not in NOT_DATA
        and not any(part.startswith((".", "_")) for part in p.relative_to(directory).parts)
    )


def _fetch_s3(uri: str, storage, cache: Path, unsafe: list[str]) -> Path:
    """Download an s3:// data source into the cache; return the local file or directory."""
    from ..storage import StorageError, open_store

    endpoint = getattr(storage, "endpoint", None)
    region = getattr(storage, "region", None)
    local = cache / "s3" / hashlib.sha1(uri.encode()).hexdigest()[:16]
    store = open_store(uri, endpoint_url=endpoint, region=region)
    if store.is_committed(DATASET_ARTIFACT):  # a bridge stage's output URI
        return _fetch_artifact(store, DATASET_ARTIFACT, local)
    parent, _, name = uri.rstrip("/").rpartition("/")
    if "/" in parent[len("s3://"):]:
        parent_store = open_store(parent, endpoint_url=endpoint, region=region)
        try:
            if parent_store.is_committed(name):  # the URI of a committed artifact itself
                return _fetch_artifact(parent_store, name, local)
        except StorageError:
            pass
    return _download_objects(store, local, unsafe)


def _fetch_artifact(store, name: str, local: Path) -> Path:
    shutil.rmtree(local, ignore_errors=True)
    return store.fetch_dir(name, local)


def _download_objects(store, local: Path, unsafe: list[str]) -> Path:
    """Plain objects under an S3 prefix (or one object), mirrored into ``local``.

    A key is a name someone else chose: one that would land outside ``local`` (``..``,
    ``prefix//abs/path``) is not downloaded; it is appended to ``unsafe`` and logged.
    """
    client, bucket, prefix = store.client, store.bucket, store.prefix

    def keys_under(p: str) -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=p)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    if prefix and prefix in keys_under(prefix):  # the URI names one object
        target = local / Path(prefix).name
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, prefix, str(target))
        return target
    base = prefix.rstrip("/") + "/" if prefix else ""
    keys = keys_under(base)
    if not keys:
        raise DataSourceError(f"{store.uri}: no objects there")
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True, exist_ok=True)
    for key in keys:
        try:
            target = inside(local, key[len(base):])
        except UnsafePath as exc:
            unsafe.append(key)
            log.warning("%s: object key skipped: %s", store.uri, exc)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
    if len(unsafe) == len(keys):
        raise DataSourceError(f"{store.uri}: every object key there is unsafe ({len(keys)} keys)")
    return local


# --- rows -------------------------------------------------------------------------------


def iter_rows(resolved: ResolvedSource, subset: str | None = None, split: str = "train") -> Iterator[dict | BadRow]:
    """Every row of the source, in a stable order; unparsable rows come out as ``BadRow``."""
    if resolved.hub_name is not None:
        yield from _hub_rows(resolved.hub_name, subset, split)
        return
    if resolved.saved_dataset is not None:
        yield from _saved_rows(resolved.saved_dataset, split)
        return
    for path in resolved.files:
        if path.suffix == ".parquet":
            yield from _parquet_rows(path)
        else:
            yield from _json_rows(path)


def _json_rows(path: Path) -> Iterator[dict | BadRow]:
    if path.suffix == ".jsonl" or not _starts_with_bracket(path):
        yield from _jsonl_rows(path)
        return
    # A JSON array is one document: read whole (write large sets as jsonl or parquet).
    try:
        rows = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise DataSourceError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(rows, dict):  # rows keyed by id (MathVista's data/testmini.json): the values
        rows = list(rows.values())
    for row in rows:
        yield row if isinstance(row, dict) else BadRow("not_an_object")


def _starts_with_bracket(path: Path) -> bool:
    """A JSON document (an array of rows, or an object of rows keyed by id), not JSON lines."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        return True
    if not head.startswith(b"{") or path.suffix != ".json":
        return False
    with path.open("rb") as f:  # one object spread over lines, not one object per line
        first = f.readline().strip()
    try:
        json.loads(first)
        return False
    except ValueError:
        return True


def _jsonl_rows(path: Path) -> Iterator[dict | BadRow]:
    """One row per line, read line by line: a data set larger than memory streams."""
    with path.open(encoding="utf-8", errors="replace") as f:
        yield from _lines_as_rows(f)


def _lines_as_rows(lines) -> Iterator[dict | BadRow]:
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield BadRow("unparsable_row", str(exc))
            continue
        yield row if isinstance(row, dict) else BadRow("not_an_object")


def _parquet_rows(path: Path, batch_rows: int = 256) -> Iterator[dict]:
    """Rows of a parquet file, a batch at a time: never the whole table in memory.

    Images stored by ``datasets`` arrive as ``{"bytes", "path"}`` structs, which
    ``materialize_image`` reads as it does a hub row's.
    """
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid (and OSError) for a broken file
        raise DataSourceError(f"{path}: not a readable parquet file: {exc}") from None
    for batch in parquet.iter_batches(batch_size=batch_rows):
        yield from batch.to_pylist()


def _saved_rows(path: Path, split: str) -> Iterator[dict]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataSelectionError(f"{path}: no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    yield from ds


def _hub_rows(name: str, subset: str | None, split: str) -> Iterator[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # offline, unknown name, no such split: say which
        raise DataSourceError(f"cannot load hub data set {name!r} (subset {subset!r}, split "
                              f"{split!r}): {type(exc).__name__}: {exc}") from exc
    yield from ds


# --- images inside rows ------------------------------------------------------------------


def materialize_image(value: Any, base_dir: Path | None, cache: Path, storage=None) -> str:
    """A local file path for one image value of a row.

    ``value`` is a path (absolute, relative to the data file, ``file://`` or ``s3://``),
    raw bytes, a ``{"bytes": ..., "path": ...}`` dict (the ``datasets`` Image feature) or
    a PIL image. Bytes and PIL images are written to the cache under their content hash.
    Raises ``LookupError`` when the image does not exist, ``TypeError`` for other types,
    ``UnsafePath`` when a path resolves outside ``base_dir`` (a row must not read, and the
    bridge must not upload, ``/etc/passwd`` or ``../../secrets``) or there is no
    ``base_dir`` to hold it (a hub data set's rows carry images, not paths).
    """
    if isinstance(value, dict):
        if value.get("bytes"):
            return _cache_bytes(value["bytes"], cache)
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return _cache_bytes(bytes(value), cache)
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return _cache_bytes(buf.getvalue(), cache)
    if not isinstance(value, str) or not value:
        raise TypeError(f"image is {type(value).__name__}, expected a path, bytes or an image")
    if value.startswith("s3://"):
        return _cache_s3_object(value, cache, storage)
    path = Path(value[len("file://"):] if value.startswith("file://") else value)
    if base_dir is None:
        raise UnsafePath(f"image path {value!r} has no data directory to lie in")
    if not path.is_absolute():
        path = base_dir / path
    path = inside_root(base_dir, path, value)
    if not path.is_file():
        raise LookupError(f"no image at {path}")
    return str(path)


def _cache_bytes(data: bytes, cache: Path) -> str:
    target = cache / "images" / f"{hashlib.sha256(data).hexdigest()}.img"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return str(target)


def _cache_s3_object(uri: str, cache: Path, storage=None) -> str:
    from ..storage import open_store, parse_uri

    parsed = parse_uri(uri)
    target = cache / "s3-images" / hashlib.sha1(uri.encode()).hexdigest()[:20] / Path(parsed.path).name
    if not target.is_file():
        parent = f"s3://{parsed.netloc}"
        store = open_store(parent, endpoint_url=getattr(storage, "endpoint", None),
                           region=getattr(storage, "region", None))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.client.download_file(parsed.netloc, parsed.path, str(target))
        except Exception as exc:
            raise LookupError(f"cannot download {uri}: {exc}") from None
    return str(target)


# --- where a row's relative image paths are looked up ------------------------------------


def _plain_relative(name: str) -> bool:
    return bool(name) and not name.startswith("/") and "\\" not in name and "\x00" not in name \
        and not any(part in ("", ".", "..") for part in name.split("/"))


class ImageRoots:
    """Finds the image a row names: in the source's folder, its data files' folders, the
    zip archives lying there (MM-Math's ``MM_Math.zip``, MathVerse's ``images.zip``) and
    the configured ``DatasetRef.imageRoots`` (local paths, ``pvc://`` or ``s3://``).

    Bytes, decoded images and ``s3://`` values go to ``materialize_image`` as before. A
    path that would leave every root (``..``, absolute) is ``UnsafePath``; one found
    nowhere is ``LookupError``.
    """

    def __init__(self, resolved: ResolvedSource, cache: Path, storage=None, image_roots: list[str] | tuple = ()):
        self.cache, self.storage = cache, storage
        local: list[Path] = [resolved.base_dir] if resolved.base_dir is not None else []
        local += [p.parent for p in resolved.files]
        self.remote: list[str] = []
        for root in image_roots or ():
            if root.startswith("s3://"):
                self.remote.append(root.rstrip("/"))
            elif root.startswith("pvc://"):
                from ..storage import open_store

                local.append(Path(open_store(root).root))
            else:
                local.append(Path(root[len("file://"):] if root.startswith("file://") else root))
        self.local = list(dict.fromkeys(local))  # in order, once each
        self._zips: list[tuple[Path, dict[str, str]]] | None = None

    @property
    def base_dir(self) -> Path | None:
        return self.local[0] if self.local else None

    def find(self, value: Any) -> str:
        if not isinstance(value, str) or value.startswith("s3://") or not self.local:
            return materialize_image(value, self.base_dir, self.cache, self.storage)
        unsafe: UnsafePath | None = None
        for root in self.local:
            try:
                return materialize_image(value, root, self.cache, self.storage)
            except LookupError:
                continue
            except UnsafePath as exc:
                unsafe = exc
        relative = value[len("file://"):] if value.startswith("file://") else value
        if not _plain_relative(relative):
            raise unsafe or UnsafePath(f"image path {value!r} is not a plain relative path")
        found = self._from_zip(relative)
        if found is not None:
            return found
        for root in self.remote:
            try:
                return _cache_s3_object(f"{root}/{relative}", self.cache, self.storage)
            except LookupError:
                continue
        if unsafe is not None:  # it exists, but only as a way out of a root (a symlink out)
            raise unsafe
        raise LookupError(f"no image {value!r} under {', '.join(map(str, self.local + self.remote))}")

    def _zip_index(self) -> list[tuple[Path, dict[str, str]]]:
        """Each zip archive in a local root, with its members by full name and by base name."""
        if self._zips is None:
            import zipfile

            self._zips = []
            for root in self.local:
                for archive in sorted(root.glob("*.zip")) if root.is_dir() else []:
                    try:
                        with zipfile.ZipFile(archive) as z:
                            members = [m for m in z.namelist() if not m.endswith("/")]
                    except (zipfile.BadZipFile, OSError) as exc:
                        log.warning("%s: not a readable zip archive (%s); its images are not used", archive, exc)
                        continue
                    index: dict[str, str] = {}
                    base_count = collections.Counter(m.rsplit("/", 1)[-1] for m in members)
                    for member in members:
                        index[member] = member
                        base = member.rsplit("/", 1)[-1]
                        if base_count[base] == 1:
                            index.setdefault(base, member)
                    self._zips.append((archive, index))
        return self._zips

    def _from_zip(self, relative: str) -> str | None:
        import zipfile

        for archive, index in self._zip_index():
            member = index.get(relative) or index.get(relative.rsplit("/", 1)[-1])
            if member is None:
                continue
            target_dir = self.cache / "zip-images" / hashlib.sha1(str(archive.resolve()).encode()).hexdigest()[:16]
            try:
                target = inside(target_dir, member)
            except UnsafePath as exc:
                raise UnsafePath(f"{archive.name}: member {member!r}: {exc}") from None
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}")
                with zipfile.ZipFile(archive) as z, z.open(member) as src, tmp.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, target)
            return str(target)
        return None
