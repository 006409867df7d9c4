"""The trainer image's GPU lock (trainer_image/requirements-gpu.lock), checked with no download.

The lock and its file manifest (requirements-gpu.files.json) are written together by
trainer_image/lock/resolve.py from pip's resolution report and each wheel's zip directory.
What these tests can see is what the wheels' metadata says: the Requires-Dist of every
locked distribution (for the closure) and the member list of every wheel (for the file
overlaps). What a wheel's code does at run time, or files written by a post-install step,
they cannot see: the image's own checks (check.py installed / pip-check / freeze, in
.github/workflows/images.yml) read the RECORDs pip wrote.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer_image" / "lock"))
import check  # noqa: E402
import resolve  # noqa: E402

# The image's interpreter and platform, as markers see them.
TARGET = {
    **default_environment(),
    "python_version": "3.11", "python_full_version": "3.11.14", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix",
}


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    return check.lock_pins()


@pytest.fixture(scope="module")
def manifest() -> dict:
    return check.load_manifest()


def extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def constraint_pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            out[check.canonical(name)] = version.strip()
    return out


def test_every_line_is_pinned_with_a_hash_and_matches_the_manifest(pins, manifest):
    assert len(pins) > 150
    assert pins == manifest["versions"], "the lock and its manifest were not written together: rerun resolve.py"
    assert set(manifest["files"]) == set(pins)
    for dropped in check.DROPPED:
        assert dropped not in pins, f"{dropped} is DROPPED but locked"


def test_cuda_python_and_cuda_bindings_are_pinned_together(pins):
    # A legacy cuda-python (12.6.x) ships the same .so files as cuda-bindings; the meta
    # package of the same release requires cuda-bindings of that release.
    assert Version(pins["cuda-python"]).major >= 13
    assert pins["cuda-python"] == pins["cuda-bindings"]
    assert f"cuda-python=={pins['cuda-python']}" in resolve.EXTRA_INPUTS


def test_the_lock_holds_the_gpu_extras_pins_and_the_constraints(pins):
    gpu = {Requirement(r).name: Requirement(r) for r in extras()["gpu"]}
    for name, req in gpu.items():
        assert name in pins, f"the gpu extra's {name} is not locked"
        assert pins[name] in req.specifier, f"{name}=={pins[name]} is outside the gpu extra's {req.specifier}"
    for raw in extras()["train"]:
        req = Requirement(raw)
        name = check.canonical(req.name)
        assert name in pins and pins[name] in req.specifier, f"train extra {raw} vs locked {pins.get(name)}"
    # Every CI pin holds in the image, but torch's CPU line (vLLM's exact torch wins).
    differ = {n: (v, pins[n]) for n, v in constraint_pins().items() if n in pins and pins[n] != v and n != "torch"}
    assert not differ, f"constraints.txt and the lock disagree (constraints, lock): {differ}"


def _closure(manifest: dict) -> tuple[set[str], list[str]]:
    """Walk Requires-Dist from the train and gpu extras (DeepSpeed's own requirements for
    its sdist) for the image's platform: what is reached, and what is not satisfied."""
    requires = manifest["requires"]
    versions = manifest["versions"]
    # The project's core dependencies too: the image installs the project with --no-deps.
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    roots = core + extras()["train"] + extras()["gpu"]
    todo = [(Requirement(r), None) for r in roots]
    seen: set[tuple[str, str]] = set()
    reached: set[str] = set()
    problems = []
    while todo:
        req, parent = todo.pop()
        name = check.canonical(req.name)
        if name in check.DROPPED:
            continue
        if name not in versions:
            problems.append(f"{parent or 'pyproject'} requires {req}, which is not locked")
            continue
        if req.specifier and not req.specifier.contains(versions[name], prereleases=True):
            problems.append(f"{parent or 'pyproject'} requires {req}, but {name}=={versions[name]} is locked")
        reached.add(name)
        for extra in sorted(req.extras) or [""]:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            for raw in requires[name]:
                sub = Requirement(raw)
                if sub.marker is None or sub.marker.evaluate({**TARGET, "extra": extra}):
                    todo.append((sub, f"{name}[{extra}]" if extra else name))
    return reached, problems


def test_the_lock_is_the_closure_of_the_train_and_gpu_extras(pins, manifest):
    reached, problems = _closure(manifest)
    assert not problems, "\n".join(sorted(problems))
    # Nothing locked that nothing asks for, beyond the DeepSpeed build's own tools.
    build = {check.canonical(Requirement(r).name) for r in resolve.BUILD_REQUIRES}
    assert set(pins) - reached <= build, f"locked but not required: {sorted(set(pins) - reached - build)}"


def test_each_dropped_wheel_is_still_asked_for_by_something_locked(manifest):
    # Otherwise DROPPED is stale: the reason written there no longer describes the lock.
    asked = set()
    for name, reqs in manifest["requires"].items():
        for raw in reqs:
            asked.add(check.canonical(Requirement(raw).name))
    for dropped in check.DROPPED:
        assert dropped in asked, f"nothing locked asks for {dropped} any more: drop it from DROPPED"


def test_no_two_locked_distributions_install_the_same_path(manifest):
    found = check.manifest_overlaps()
    assert set(found) == set(check.ACCEPTED_OVERLAPS), {p: d for p, d in found.items()
                                                        if p not in check.ACCEPTED_OVERLAPS}
    # The manifest is not empty of what matters: the wheels that used to collide are listed.
    files = manifest["files"]
    assert any(f.startswith("cuda/bindings") for f in files["cuda-bindings"])
    assert any(f.startswith("torch/") for f in files["torch"])


def test_the_overlap_check_sees_what_issue_20_saw():
    # The legacy cuda-python wheel beside cuda-bindings: the same driver bindings .so.
    legacy = {
        "cuda-python": ["cuda/bindings/cydriver.cpython-311-x86_64-linux-gnu.so", "cuda/__init__.py"],
        "cuda-bindings": ["cuda/bindings/", "cuda-bindings.dist-info/"],
        "nvidia-a": ["nvidia/a/"],
        "nvidia-b": ["nvidia/b/lib.so"],
    }
    found = check.overlaps(legacy)
    assert set(found) == {"cuda/bindings"} and found["cuda/bindings"] == ["cuda-bindings", "cuda-python"]
    assert check.overlaps({"a": ["x/y.py"], "b": ["x/y.py"]}) == {"x/y.py": ["a", "b"]}
    assert check.overlaps({"a": ["nvidia/a/"], "b": ["nvidia/b/"]}) == {}


def test_pip_check_allows_only_the_dropped_wheels():
    out = ("humming-kernels 0.1.19 requires nvidia-cuda-nvcc, which is not installed.\n"
           "nvidia-cutlass-dsl 4.8.0 requires nvidia-cutlass-dsl-libs-cu12, which is not installed.\n")
    assert check.pip_check_problems(out) == []
    bad = out + "vllm 0.33.0 has requirement torch==2.14.0, but you have torch 2.13.0.\n"
    assert check.pip_check_problems(bad) == ["vllm 0.33.0 has requirement torch==2.14.0, but you have torch 2.13.0."]
    assert check.pip_check_problems("x 1 requires numpy, which is not installed.\n")


def test_freeze_is_compared_both_ways():
    pins = {"torch": "2.14.0", "vllm": "0.33.0"}
    assert check.freeze_mismatches("torch==2.14.0\nvllm==0.33.0\nvisionr1 @ file:///src\n", pins,
                                   ignore={"visionr1"}) == []
    problems = check.freeze_mismatches("torch==2.13.0\nextra==1\n", pins)
    assert problems == ["extra==1 is installed but not in the lock", "torch: installed 2.13.0, locked 2.14.0",
                        "vllm==0.33.0 is locked but not installed"]


def test_the_overlap_check_reads_this_environment():
    # The same function runs in the image; here it reads this venv's RECORDs.
    files = check.installed_files()
    assert "pydantic" in files and any(f.startswith("pydantic/") for f in files["pydantic"])
    assert all(not f.startswith("/") for fs in files.values() for f in fs if not f.startswith("$prefix"))


def test_resolve_asks_for_the_image_platform_and_no_index_by_name():
    tags = resolve.platforms()
    assert tags[0] == f"manylinux_2_{resolve.GLIBC_MINOR}_x86_64" and "manylinux2014_x86_64" in tags
    assert tags.index("manylinux_2_17_x86_64") < tags.index("manylinux2014_x86_64")
    text = (ROOT / "trainer_image" / "lock" / "resolve.py").read_text()
    assert not re.search(r"https?://", text), "resolve.py must leave the index to pip's configuration"
