"""Checks of the trainer image's GPU lock (requirements-gpu.lock). Standard library only.

Three readers of the same question, "does what the image installs hold together?":

- ``lock_pins`` / ``manifest_overlaps`` read the committed lock and its file manifest
  (``requirements-gpu.files.json``, gathered at lock time from each wheel's zip directory):
  the test suite runs them with no download and no image.
- ``installed_overlaps`` reads the RECORD of every distribution installed in an environment:
  the CI workflow runs it inside the built image (``python check.py installed``).
- ``freeze_mismatches`` compares ``pip freeze`` of the image with the lock.

``python check.py installed`` and ``python check.py freeze FILE`` exit 1 naming each problem.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCK = HERE.parent / "requirements-gpu.lock"
MANIFEST = HERE.parent / "requirements-gpu.files.json"

_LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)(?P<hashes>(\s+--hash=sha256:[0-9a-f]{64})+)\s*$")


# Resolved but left out of the lock and the image, each with what asks for it and why it is
# not needed. tests/test_lock.py allows exactly these as unmet requirements (and checks that
# something still asks for each); ``check.py pip-check`` allows exactly these in the image.
DROPPED = {
    "nvidia-cuda-nvcc": "humming-kernels[cu13] (from vllm) asks for it unpinned, so pip takes the newest "
    "(13.5, not torch's 13.0). The image has CUDA 13.0's nvcc from the base's apt repository at "
    "/usr/local/cuda, where humming, FlashInfer, Triton and DeepSpeed find it",
    "nvidia-cuda-crt": "only nvidia-cuda-nvcc asks for it (nvcc's headers; apt's cuda-nvcc-13-0 has them)",
    "nvidia-nvvm": "only nvidia-cuda-nvcc asks for it (nvcc's libNVVM; apt's cuda-nvcc-13-0 has it)",
    "nvidia-cutlass-dsl-libs-cu12": "nvidia-cutlass-dsl asks for its CUDA 12 libraries unconditionally; on "
    "CUDA 13 the [cu13] extra that vllm asks for brings nvidia-cutlass-dsl-libs-cu13, the ones it loads",
}
# Paths two locked wheels both install, found by the manifest and accepted, with the reason.
# Any other overlap fails tests/test_lock.py and the image's check.
ACCEPTED_OVERLAPS = {
    "build_backend.py": "flashinfer-python and torch-c-dlpack-ext both ship their in-tree PEP 517 build "
    "backend at the site-packages root by mistake; nothing imports a module named build_backend at run time",
}


def canonical(name: str) -> str:
    """PEP 503 normalized name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(path: Path = LOCK) -> dict[str, str]:
    """``name -> version`` of every locked distribution; a malformed line raises ValueError."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        found = _LINE.match(line)
        if not found:
            raise ValueError(f"{path.name}:{number}: not 'name==version --hash=sha256:...': {line[:80]}")
        name = canonical(found["name"])
        if name in pins:
            raise ValueError(f"{path.name}:{number}: {name} is locked twice")
        pins[name] = found["version"]
    return pins


def overlaps(files_by_dist: dict[str, list[str]]) -> dict[str, list[str]]:
    """``path -> [dists]`` for every path two or more distributions install.

    A path that is a directory of one and a file of another counts too (one would
    overwrite the other). Directories both merely contain (``nvidia/``, ``bin/``) do not.
    """
    owners: dict[str, list[str]] = defaultdict(list)
    for dist, files in files_by_dist.items():
        for f in set(files):
            owners[f.rstrip("/")].append(dist)
    out = {p: sorted(d) for p, d in owners.items() if len(d) > 1}
    # A file of one distribution that is a directory prefix of another's entry.
    prefixes: dict[str, set[str]] = defaultdict(set)
    for dist, files in files_by_dist.items():
        for f in files:
            parts = f.rstrip("/").split("/")
            for i in range(1, len(parts)):
                prefixes["/".join(parts[:i])].add(dist)
    for path, dists in owners.items():
        inside = prefixes.get(path, set()) - set(dists)
        if inside:
            out[path] = sorted(set(dists) | inside)
    return out


def manifest_overlaps(path: Path = MANIFEST) -> dict[str, list[str]]:
    return overlaps(load_manifest(path)["files"])


def load_manifest(path: Path = MANIFEST) -> dict:
    """``{"versions": {dist: version}, "files": {dist: [path, ...]}}``.

    Paths are what the wheels' zip directories list, with the ``.data/<scheme>/`` prefix
    mapped to where pip installs it (``scripts`` -> ``bin/``, ``purelib``/``platlib`` -> the
    site-packages root, ``data`` -> the prefix, ``headers`` -> ``include/``), so a script of
    one wheel and a script of another compare as the same path. A directory whose files all
    belong to one distribution is listed once, with a trailing ``/``, for brevity: two
    distributions that share a file both list it in full.
    """
    return json.loads(path.read_text())


def installed_files() -> dict[str, list[str]]:
    """Every installed distribution's files (from its RECORD), as paths relative to the prefix."""
    import sysconfig
    from importlib import metadata

    import os

    prefix = os.path.normpath(sys.prefix)
    site = os.path.normpath(sysconfig.get_paths()["purelib"])
    out: dict[str, list[str]] = {}
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        files = []
        for f in dist.files or []:
            full = os.path.normpath(os.path.join(site, str(f)))
            if full.startswith(site + os.sep):
                rel = full[len(site) + 1:]
            elif full.startswith(prefix + os.sep):
                rel = "$prefix/" + full[len(prefix) + 1:]
            else:
                rel = full
            # Every distribution has its own dist-info; compiled caches are pip's, not the wheel's.
            if "__pycache__/" in rel or rel.endswith(".pyc"):
                continue
            files.append(rel)
        out.setdefault(name, []).extend(files)
    return out


def installed_overlaps() -> dict[str, list[str]]:
    return overlaps(installed_files())


def freeze_mismatches(freeze_text: str, pins: dict[str, str], *, ignore: set[str] = frozenset()) -> list[str]:
    """What ``pip freeze`` shows that the lock does not say, and the other way round."""
    frozen: dict[str, str] = {}
    for line in freeze_text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if " @ " in line:
            name, _, where = line.partition(" @ ")
            frozen[canonical(name)] = where.strip()
        else:
            name, _, version = line.partition("==")
            frozen[canonical(name)] = version.strip()
    problems = []
    for name, version in sorted(frozen.items()):
        if name in ignore:
            continue
        if name not in pins:
            problems.append(f"{name}=={version} is installed but not in the lock")
        elif pins[name] != version:
            problems.append(f"{name}: installed {version}, locked {pins[name]}")
    for name in sorted(set(pins) - set(frozen) - ignore):
        problems.append(f"{name}=={pins[name]} is locked but not installed")
    return problems


def pip_check_problems(output: str) -> list[str]:
    """The lines of ``pip check`` that are not a DROPPED distribution reported missing."""
    problems = []
    for line in output.splitlines():
        missing = re.match(r"^\S+ \S+ requires (\S+?),? which is not installed\.?$", line.strip())
        if missing and canonical(re.split(r"[<>=!~\[;]", missing.group(1))[0]) in DROPPED:
            continue
        if line.strip() and not line.startswith("No broken requirements"):
            problems.append(line.strip())
    return problems


def _report(found: dict[str, list[str]]) -> int:
    found = {p: d for p, d in found.items() if p not in ACCEPTED_OVERLAPS}
    for path, dists in sorted(found.items())[:200]:
        print(f"{path}: installed by {', '.join(dists)}", file=sys.stderr)
    if found:
        print(f"{len(found)} paths are installed by more than one distribution", file=sys.stderr)
        return 1
    print("no two distributions install the same path")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["installed"]:
        return _report(installed_overlaps())
    if argv[:1] == ["manifest"]:
        return _report(manifest_overlaps())
    if argv[:1] == ["pip-check"]:
        import subprocess

        out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
        problems = pip_check_problems(out.stdout + out.stderr)
        for p in problems:
            print(p, file=sys.stderr)
        if not problems:
            print(f"pip check: nothing broken but the {len(DROPPED)} distributions left out on purpose")
        return 1 if problems else 0
    if len(argv) == 2 and argv[0] == "freeze":
        # The project itself (visionr1) is installed from the source, and pip is pinned on its
        # own (the Makefile's PIP_VERSION): neither is in the lock. Use `pip freeze --all`.
        problems = freeze_mismatches(Path(argv[1]).read_text(), lock_pins(), ignore={"visionr1", "pip"})
        for p in problems:
            print(p, file=sys.stderr)
        if not problems:
            print("pip freeze matches the lock")
        return 1 if problems else 0
    print("usage: check.py installed | manifest | pip-check | freeze FILE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
