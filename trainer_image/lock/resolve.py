"""Write the trainer image's GPU lock: ``trainer_image/requirements-gpu.lock`` and its file manifest.

    nice -n 10 .venv/bin/python trainer_image/lock/resolve.py

What it does, with no multi-GB download (metadata only):

1. Resolves the ``train`` and ``gpu`` extras of pyproject.toml under constraints.txt (less
   its CPU torch line, as the image always did) with the same pip as the Makefile, for the
   image's interpreter and platform: CPython 3.11 on x86_64 glibc 2.39 (Ubuntu 24.04), every
   manylinux tag down to manylinux1, wheels only (``pip install --dry-run --ignore-installed
   --report``; pip reads each wheel's METADATA from the index, PEP 658, without the wheel).
2. DeepSpeed ships no wheel: its sdist's setup.py imports torch, so its metadata cannot be
   built for another platform. Its requirements (DEEPSPEED_REQUIRES, read from the
   Requires-Dist of a CUDA build) go into the resolve instead, and its sdist's hash into
   the lock; the Dockerfile builds it after the rest, with DS_BUILD_OPS=0.
3. Writes one line per distribution, ``name==version --hash=sha256:<the wheel's>``, which
   ``pip install --require-hashes --no-deps -r`` installs exactly.
4. Reads each locked wheel's zip central directory with HTTP range requests (a few KB from
   the end of each wheel, not the wheel) and writes the paths every wheel installs:
   ``requirements-gpu.files.json``, for the overlap check in tests/test_lock.py.

Nothing here names an index: pip's own configuration decides where it reads from.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
import zipfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check import DROPPED, LOCK, MANIFEST, canonical, overlaps  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PYTHON_VERSION = "3.11"
GLIBC_MINOR = 39  # Ubuntu 24.04, the nvidia/cuda base of trainer_image/Dockerfile
DEEPSPEED = "deepspeed==0.19.8"
# deepspeed 0.19.8's Requires-Dist when built where torch sees CUDA (setup.py adds
# nvidia-ml-py for the cuda accelerator).
DEEPSPEED_REQUIRES = [
    "einops", "hjson", "msgpack", "ninja", "numpy", "packaging>=20.0", "psutil", "py-cpuinfo",
    "pydantic>=2.0.0", "torch>=2.0.0", "tqdm", "nvidia-ml-py",
]
DEEPSPEED_SCRIPTS = ["deepspeed", "deepspeed.pt", "ds", "ds_bench", "ds_io", "ds_nvme_tune", "ds_report", "ds_ssh", "dsr"]
# What the DeepSpeed build needs in the venv (--no-build-isolation).
BUILD_REQUIRES = ["setuptools", "wheel"]
# Pinned together: cuda-python is a meta package over cuda-bindings; a legacy cuda-python
# (12.6.x) installs the same .so files as cuda-bindings (see issue 20).
EXTRA_INPUTS = ["cuda-python==13.4.4", "cuda-bindings==13.4.4"]


def platforms(glibc_minor: int = GLIBC_MINOR) -> list[str]:
    """Every manylinux tag a glibc 2.<minor> x86_64 host accepts, best first (as packaging orders them)."""
    tags = []
    for minor in range(glibc_minor, 4, -1):
        tags.append(f"manylinux_2_{minor}_x86_64")
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}.get(minor)
        if legacy:
            tags.append(f"{legacy}_x86_64")
    return tags


def inputs() -> list[str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    reqs = [r for r in extras["train"] + extras["gpu"] if canonical(re.split(r"[=<>!~\[; ]", r)[0]) != "deepspeed"]
    assert len(reqs) == len(extras["train"]) + len(extras["gpu"]) - 1, "the gpu extra no longer has deepspeed"
    return reqs + DEEPSPEED_REQUIRES + BUILD_REQUIRES + EXTRA_INPUTS


def constraints() -> str:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return "\n".join(l for l in lines if not re.match(r"^(torch|deepspeed)==", l)) + "\n"


def resolve(work: Path) -> dict:
    (work / "requirements.in").write_text("\n".join(inputs()) + "\n")
    (work / "constraints.txt").write_text(constraints())
    cmd = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
        "--report", str(work / "report.json"),
        "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp311",
        "--only-binary=:all:",
        *[f"--platform={p}" for p in platforms()],
        "-r", str(work / "requirements.in"), "-c", str(work / "constraints.txt"),
    ]
    # Local wheel folders of this machine are not what the image installs.
    env = {**os.environ, "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "0"}
    subprocess.run(cmd, check=True, env=env)
    return json.loads((work / "report.json").read_text())


def sdist_hash(requirement: str, work: Path) -> tuple[str, str]:
    """(version, sha256) of an sdist; its metadata is built here (DeepSpeed's imports torch)."""
    out = work / "sdist"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary=:all:",
         "--no-build-isolation", "-d", str(out), requirement],
        check=True, env={**os.environ, "PIP_FIND_LINKS": ""},
    )
    (path,) = out.iterdir()
    version = requirement.split("==")[1]
    return version, hashlib.sha256(path.read_bytes()).hexdigest()


class RangeFile(io.RawIOBase):
    """A seekable read-only view of a URL through HTTP range requests, in cached blocks."""

    BLOCK = 1 << 18

    def __init__(self, url: str, size: int):
        self.url, self.size, self.pos = url, size, 0
        self.blocks: dict[int, bytes] = {}
        self.requests = 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def _block(self, index: int) -> bytes:
        if index not in self.blocks:
            start = index * self.BLOCK
            end = min(start + self.BLOCK, self.size) - 1
            req = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end}"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                if resp.status != 206:
                    raise RuntimeError(f"{self.url}: no range support (HTTP {resp.status})")
                self.blocks[index] = resp.read()
            self.requests += 1
        return self.blocks[index]

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        got = bytearray()
        while len(got) < n:
            index, offset = divmod(self.pos + len(got), self.BLOCK)
            got += self._block(index)[offset:offset + n - len(got)]
        buffer[:n] = got
        self.pos += n
        return n


def content_length(url: str) -> int:
    req = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return int(resp.headers["Content-Length"])


def install_path(member: str) -> str | None:
    """Where pip puts a wheel member, relative to site-packages ($prefix/ for the rest)."""
    if member.endswith("/"):  # a directory entry: its files say what is installed
        return None
    parts = member.split("/")
    if len(parts) > 2 and parts[0].endswith(".data"):
        scheme, rest = parts[1], "/".join(parts[2:])
        return {
            "purelib": rest,
            "platlib": rest,
            "scripts": f"$prefix/bin/{rest}",
            "headers": f"$prefix/include/{rest}",
            "data": f"$prefix/{rest}",
        }.get(scheme, f"$prefix/{scheme}/{rest}")
    return member


def wheel_files(url: str) -> tuple[list[str], int, int]:
    """(installed paths, the wheel's size, its unpacked size), from its zip central directory."""
    size = content_length(url)
    f = RangeFile(url, size)
    with zipfile.ZipFile(io.BufferedReader(f, buffer_size=1 << 16)) as z:
        infos = z.infolist()
    paths = [p for p in (install_path(i.filename) for i in infos) if p]
    return paths, size, sum(i.file_size for i in infos)


def compact(files_by_dist: dict[str, list[str]]) -> dict[str, list[str]]:
    """Collapse every directory whose files all belong to one distribution into ``dir/``."""
    owners: dict[str, set[str]] = defaultdict(set)
    for dist, files in files_by_dist.items():
        for f in files:
            parts = f.split("/")
            for i in range(1, len(parts) + 1):
                owners["/".join(parts[:i])].add(dist)
    out: dict[str, list[str]] = {}
    for dist, files in files_by_dist.items():
        kept = set()
        for f in files:
            parts = f.split("/")
            # The shortest prefix that only this distribution has under it.
            for i in range(1, len(parts) + 1):
                prefix = "/".join(parts[:i])
                if owners[prefix] == {dist}:
                    kept.add(prefix + ("/" if i < len(parts) else ""))
                    break
            else:
                kept.add(f)  # a file another distribution also installs: listed in full
        out[dist] = sorted(kept)
    return out


def write_lock(report: dict, deepspeed: tuple[str, str], path: Path = LOCK) -> dict[str, str]:
    lines = []
    versions = {}
    for item in report["install"]:
        meta = item["metadata"]
        name, version = canonical(meta["name"]), meta["version"]
        if name in DROPPED:
            continue
        sha = item["download_info"]["archive_info"]["hashes"]["sha256"]
        lines.append(f"{name}=={version} --hash=sha256:{sha}")
        versions[name] = version
    lines.append(f"deepspeed=={deepspeed[0]} --hash=sha256:{deepspeed[1]}")
    versions["deepspeed"] = deepspeed[0]
    header = (
        "# The trainer image's Python packages, every one pinned with its hash: the train and gpu\n"
        "# extras under constraints.txt (less its CPU torch line), resolved by pip for CPython 3.11\n"
        "# on x86_64 glibc 2.39 (Ubuntu 24.04). Generated by trainer_image/lock/resolve.py; do not edit.\n"
        "# trainer_image/Dockerfile installs it with `pip install --require-hashes --no-deps`;\n"
        "# deepspeed (an sdist) is built after the rest, with DS_BUILD_OPS=0.\n"
    )
    path.write_text(header + "\n".join(sorted(lines)) + "\n")
    return versions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-files", action="store_true", help="write the lock only, not the file manifest")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = resolve(work)
        deepspeed = sdist_hash(DEEPSPEED, work)
        versions = write_lock(report, deepspeed)
        print(f"locked {len(versions)} distributions in {LOCK.relative_to(ROOT)}")
        if args.skip_files:
            return 0
        files: dict[str, list[str]] = {}
        sizes: dict[str, int] = {}
        unpacked: dict[str, int] = {}
        requires: dict[str, list[str]] = {"deepspeed": DEEPSPEED_REQUIRES}
        for item in report["install"]:
            name = canonical(item["metadata"]["name"])
            if name in DROPPED:
                continue
            requires[name] = item["metadata"].get("requires_dist") or []
            url = item["download_info"]["url"]
            files[name], sizes[name], unpacked[name] = wheel_files(url)
            print(f"  {name}: {len(files[name])} files", flush=True)
        # DeepSpeed's sdist: the files its build installs are its package and its scripts.
        # Its scripts, as its setup.py lists them (and the RECORD of a build shows).
        files["deepspeed"] = ["deepspeed/", *(f"$prefix/bin/{s}" for s in DEEPSPEED_SCRIPTS)]
        found = overlaps(files)
        MANIFEST.write_text(json.dumps({
            "versions": dict(sorted(versions.items())),
            "dropped": DROPPED,
            "requires": dict(sorted(requires.items())),
            "wheelBytes": dict(sorted(sizes.items())),
            "unpackedBytes": dict(sorted(unpacked.items())),
            "files": compact(files),
        }, indent=1, sort_keys=True) + "\n")
        print(f"file manifest: {MANIFEST.relative_to(ROOT)}; {len(found)} overlapping paths")
        for path, dists in sorted(found.items())[:50]:
            print(f"  {path}: {dists}")
        print(f"wheels: {sum(sizes.values()) / 2**30:.2f} GiB compressed, "
              f"{sum(unpacked.values()) / 2**30:.2f} GiB unpacked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
