"""The two container images, read from their Dockerfiles (no Docker engine, no network).

`Dockerfile` is the operator (kopf, no torch); `trainer_image/Dockerfile` the trainer (CUDA,
vLLM, DeepSpeed). The checks tie each file to what it must agree with: the extras in
pyproject.toml, the pins in constraints.txt, the Makefile's pip, the chart's and the Job
builder's uids, the ports the code listens on, and the CUDA of the torch that vllm pins.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from visionr1_operator.cluster import jobs, naming
from visionr1_operator.cluster.__main__ import build_parser
from visionr1_trainer.config import StageContext

ROOT = Path(__file__).resolve().parents[1]
OPERATOR = ROOT / "Dockerfile"
TRAINER = ROOT / "trainer_image" / "Dockerfile"


@dataclass(frozen=True)
class GpuStack:
    """What one vllm release brings, read from its wheel's METADATA (Requires-Dist)."""

    cuda: str  # major.minor of the CUDA its torch's default wheel is built for
    requires: dict[str, str]  # its requirements on packages that pyproject or constraints.txt pin too


# vllm pin (the gpu extra) -> its stack. vllm 0.33.0 requires torch==2.14.0, and torch
# 2.14.0's manylinux wheel requires cuda-toolkit[...]==13.0.3, so CUDA 13.0. A vllm bump
# needs a new row here, read the same way (`pip install --dry-run --no-deps --report`).
GPU_STACKS = {
    "0.33.0": GpuStack(
        cuda="13.0",
        requires={"torch": "==2.14.0", "transformers": ">=5.16.1,<5.21.0", "lark": "==1.2.2"},
    ),
}

# Packages that put a C compiler into an image.
COMPILERS = {"gcc", "g++", "cc", "c++", "clang", "build-essential", "make"}


# --- a small Dockerfile reader ----------------------------------------------------------

KEYWORDS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER",
}


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY...
    args: str  # the rest; continued lines joined with a space
    line: int  # where it starts, for messages


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse_instructions(text: str) -> list[Instruction]:
    """Instructions in order. A line ending in a backslash continues on the next; comments and
    blank lines inside a continued instruction are dropped, as Docker drops them. A continued
    line that starts with an instruction's keyword is taken for a stray backslash."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not parts:
            start = number
        elif line.split(" ", 1)[0] in KEYWORDS:
            raise ValueError(f"line {number}: {line.split()[0]} inside the instruction of line {start} "
                             "(a stray backslash before it?)")
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        parts.append(line)
        keyword, _, args = " ".join(parts).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    if parts:
        raise ValueError(f"line {start}: the file ends inside a continued instruction")
    return out


def split_stages(instructions: list[Instruction]) -> list[Stage]:
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            if ins.keyword != "ARG":
                raise ValueError(f"line {ins.line}: {ins.keyword} before the first FROM")
        else:
            stages[-1].instructions.append(ins)
    return stages


@cache
def stages_of(path: Path) -> list[Stage]:
    return split_stages(parse_instructions(path.read_text()))


def env_of(stage: Stage) -> dict[str, str]:
    """ENV of a stage, both forms (`K=V K2=V2` and the legacy `K V`)."""
    env: dict[str, str] = {}
    for args in stage.args("ENV"):
        words = shlex.split(args)
        if "=" in words[0]:
            env.update(w.split("=", 1) for w in words)
        else:
            env[words[0]] = args.split(None, 1)[1]
    return env


def image_refs(path: Path) -> list[str]:
    """Every image pulled: FROM bases, COPY --from and RUN --mount=from= that name no stage."""
    stages = stages_of(path)
    names = {s.name for s in stages if s.name}
    refs = [s.image for s in stages]
    for stage in stages:
        for ins in stage.instructions:
            refs += re.findall(r"--from=([^\s,]+)", ins.args)
            refs += re.findall(r"--mount=\S*?\bfrom=([^\s,]+)", ins.args)
    return [r for r in refs if r not in names and not r.isdigit()]


def project_installs(stage: Stage) -> list[str]:
    """The RUNs that pip-install this project: from the build context bind-mounted at /src."""
    return [r for r in stage.args("RUN") if re.search(r"pip (install|wheel)\b", r)
            and re.search(r"--mount=type=bind,target=/src\b", r)]


def bind_sources(stage: Stage) -> list[str]:
    """What RUN --mount=type=bind takes from the build context (``.`` for all of it)."""
    out = []
    for run in stage.args("RUN"):
        for mount in re.findall(r"--mount=(\S+)", run):
            opts = dict(o.split("=", 1) if "=" in o else (o, "") for o in mount.split(","))
            if opts.get("type") == "bind" and "from" not in opts:
                out.append(opts.get("source", "."))
    return out


def syntax_line(path: Path) -> str | None:
    first = path.read_text().splitlines()[0]
    found = re.match(r"^# syntax=(\S+)$", first)
    return found.group(1) if found else None


def final_user(stage: Stage) -> tuple[str, str | None]:
    users = stage.args("USER")
    assert users, "the final stage sets no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    return uid, gid or None


# --- what the files must agree with ---------------------------------------------------


@cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def extra(name: str) -> dict[str, Requirement]:
    reqs = (Requirement(r) for r in pyproject()["project"]["optional-dependencies"][name])
    return {r.name.lower(): r for r in reqs}


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def makefile_pip_version() -> str:
    found = re.search(r"^PIP_VERSION\s*:?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile no longer sets PIP_VERSION"
    return found.group(1)


def vllm_pin() -> str:
    spec = str(extra("gpu")["vllm"].specifier)
    assert spec.startswith("==") and "," not in spec, f"the gpu extra must pin vllm exactly, got {spec!r}"
    return spec[2:]


def gpu_stack() -> GpuStack:
    pin = vllm_pin()
    assert pin in GPU_STACKS, (
        f"pyproject pins vllm=={pin}, but GPU_STACKS in {Path(__file__).name} knows only "
        f"{sorted(GPU_STACKS)}: add its torch, CUDA and requirements from the wheel's METADATA"
    )
    return GPU_STACKS[pin]


# --- both images -------------------------------------------------------------------------


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_every_image_pulled_is_pinned_by_full_version_and_digest(path):
    # A tag alone moves (python:3.11-slim, latest); the digest makes the build repeatable.
    refs = image_refs(path)
    assert refs
    pinned = re.compile(r"^[\w./-]+:(?P<tag>\d+\.\d+\.\d+[\w.-]*)@sha256:[0-9a-f]{64}$")
    for ref in refs:
        assert pinned.match(ref), f"{path.name}: {ref} is not pinned as name:X.Y.Z...@sha256:<digest>"


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_the_frontend_is_pinned_and_make_images_names_the_platform(path):
    # RUN --mount needs BuildKit's Dockerfile frontend; the line pins its version.
    syntax = syntax_line(path)
    assert syntax and re.fullmatch(r"docker/dockerfile:1\.\d+(\.\d+)?(@sha256:[0-9a-f]{64})?", syntax), syntax
    make = (ROOT / "Makefile").read_text()
    recipe = make.split("\nimages:", 1)[1].split("\n\n", 1)[0]
    builds = [line for line in recipe.splitlines() if "docker build" in line or "buildx build" in line]
    assert len(builds) == 2 and all("--platform linux/amd64" in b for b in builds), builds
    wanted = f"-f {path.relative_to(ROOT)}" if path == TRAINER else None
    assert wanted is None or any(wanted in b for b in builds)


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_the_project_goes_in_last_with_no_deps_and_no_source_copy(path):
    # Dependencies first, so a source change rebuilds one small layer; the source comes in by
    # a bind mount of the build context, so no /src (or COPY of it) stays in any layer.
    stage = stages_of(path)[0 if path == OPERATOR else -1]
    runs = stage.args("RUN")
    (install,) = project_installs(stage)
    assert "--no-deps" in install.split(), install
    assert runs.index(install) == max(i for i, r in enumerate(runs) if re.search(r"pip install\b", r))
    for s in stages_of(path):
        for copy in s.args("COPY"):
            assert "--from=" in copy, f"{path.name} copies from the build context: COPY {copy}"
    assert "WORKDIR /src" not in path.read_text()


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_pip_is_the_makefiles_and_is_pinned_before_the_project_install(path):
    version = makefile_pip_version()
    stage = stages_of(path)[0 if path == OPERATOR else -1]
    runs = stage.args("RUN")
    pins = [(i, v) for i, run in enumerate(runs) for v in re.findall(r"\bpip==([\w.]+)", run)]
    assert pins, f"{path.name}: pip is not pinned (Makefile: pip=={version})"
    assert {v for _, v in pins} == {version}, f"{path.name}: pip {pins} differs from the Makefile's {version}"
    install = next(i for i, run in enumerate(runs) if run in project_installs(stage))
    assert pins[0][0] <= install, f"{path.name}: pip is pinned after the project is installed"


@pytest.mark.parametrize(
    ("path", "package"),
    [(OPERATOR, "operator/visionr1_operator"), (TRAINER, "trainer_image/visionr1_trainer")],
    ids=["operator", "trainer"],
)
def test_entrypoint_runs_the_package_in_exec_form(path, package):
    # Exec form: Python is PID 1 and gets SIGTERM itself (kopf's graceful stop, the trainer's
    # commit-and-exit-143); a shell form would put /bin/sh in between.
    entry = stages_of(path)[-1].args("ENTRYPOINT")
    assert entry, f"{path.name} has no ENTRYPOINT"
    module = package.split("/")[-1]
    assert json.loads(entry[-1]) == ["python", "-m", module]
    assert (ROOT / package / "__main__.py").exists()


# What building the project (`pip install /src`) reads from the build context.
PROJECT_BUILD = ["pyproject.toml", "README.md", "operator", "trainer_image/visionr1_trainer"]


def copied_files(path: Path) -> list[str]:
    """What the Dockerfile reads from the build context (COPY, RUN --mount=type=bind): each
    source and the .py files under it; the whole context (``.``) means the project's build."""
    sources = []
    for stage in stages_of(path):
        for args in stage.args("COPY"):
            if "--from=" not in args:
                sources += [w for w in args.split() if not w.startswith("--")][:-1]
        for src in bind_sources(stage):
            sources += PROJECT_BUILD if src == "." else [src]
    out = []
    for src in sources:
        top = ROOT / src
        files = [top, *top.rglob("*.py")] if top.is_dir() else [top]
        out += [f.relative_to(ROOT).as_posix() for f in files if "__pycache__" not in f.parts]
    return out


def test_dockerignore_keeps_what_the_images_copy_and_drops_the_rest():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    for path in (OPERATOR, TRAINER):
        for rel in copied_files(path):
            assert not ignored(rel, patterns), f".dockerignore drops {rel}, which {path.name} copies"
    for heavy in (".venv/bin/python", ".git/HEAD", "runs/x", "tests/test_images.py"):
        assert ignored(heavy, patterns), f".dockerignore lets {heavy} into the build context"


def ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    candidates = [rel] + ["/".join(rel.split("/")[:i]) for i in range(1, rel.count("/") + 1)]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            verdict = not negate
    return verdict


# --- the operator image ------------------------------------------------------------------


def test_operator_is_multi_stage_and_its_final_stage_has_no_compiler():
    stages = stages_of(OPERATOR)
    assert len(stages) >= 2, "the operator image must build in one stage and ship another"
    final = stages[-1]
    assert "slim" in final.image.split(":")[1], f"{final.image}: the final base must be a slim image (no gcc)"
    for run in final.args("RUN"):
        assert not re.search(r"pip (install|wheel)\b", run), "the final stage installs packages itself"
        if re.search(r"\b(apt-get|apt|apk)\b.*\binstall\b", run):
            assert not COMPILERS & set(shlex.split(run)), f"the final stage installs a compiler: {run}"
    assert any("--from=" in c for c in final.args("COPY")), "the final stage copies nothing from the build stage"


def test_operator_installs_exactly_the_operator_extra_with_the_constraints():
    defined = pyproject()["project"]["optional-dependencies"]
    assert "operator" in defined, f"pyproject.toml's extras are {sorted(defined)}, no operator"
    build = stages_of(OPERATOR)[0]
    (deps,) = [r for r in build.args("RUN") if re.search(r"pip install\b", r) and " -r " in r]
    # The requirements are pyproject's core and operator extra, read in the build.
    assert "['dependencies'] + p['optional-dependencies']['operator']" in deps
    assert re.search(r"-c /tmp/ctx/constraints\.txt\b", deps)
    assert {"pyproject.toml", "constraints.txt"} <= set(bind_sources(build))
    # What that one-liner prints, run here: every line is pinned by constraints.txt.
    p = pyproject()["project"]
    reqs = [Requirement(r) for r in p["dependencies"] + p["optional-dependencies"]["operator"]]
    pins = constraint_pins()
    assert all(r.name.lower().replace("_", "-") in pins for r in reqs), [r.name for r in reqs]
    assert not any(r.name.lower() == "torch" for r in reqs)


def test_operator_runs_as_the_charts_uid():
    values = yaml.safe_load((ROOT / "charts" / "visionr1-operator" / "values.yaml").read_text())
    pod = values["podSecurityContext"]
    final = stages_of(OPERATOR)[-1]
    uid, gid = final_user(final)
    assert uid.isdigit() and int(uid) != 0, f"USER {uid}: runAsNonRoot needs a numeric, non-zero uid"
    assert (int(uid), int(gid or uid)) == (pod["runAsUser"], pod["runAsGroup"])
    assert any(f"--uid {uid}" in run for run in final.args("RUN")), f"no passwd entry for uid {uid}"


def test_operator_writes_nothing_outside_tmp_and_exposes_its_ports():
    # The chart: readOnlyRootFilesystem, an emptyDir on /tmp.
    env = env_of(stages_of(OPERATOR)[-1])
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1" and env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("HOME", "").startswith("/tmp"), "HOME must be under /tmp, the only writable path"
    defaults = build_parser().parse_args([])
    exposed = {int(p.split("/")[0]) for a in stages_of(OPERATOR)[-1].args("EXPOSE") for p in a.split()}
    assert {defaults.metrics_port, defaults.health_port} == {8080, 8081} <= exposed


# --- the trainer image -------------------------------------------------------------------


LOCK = "trainer_image/requirements-gpu.lock"


def test_trainer_installs_every_dependency_from_the_lock_with_hashes():
    defined = pyproject()["project"]["optional-dependencies"]
    assert {"train", "gpu"} <= set(defined), f"pyproject.toml's extras are {sorted(defined)}, not train and gpu"
    assert {"vllm", "deepspeed"} <= set(extra("gpu"))
    stage = stages_of(TRAINER)[-1]
    runs = stage.args("RUN")
    from_lock = [r for r in runs if f"source={LOCK}" in r]
    assert len(from_lock) == 2, "the wheels, then DeepSpeed's sdist, both from the lock"
    wheels, deepspeed = from_lock
    for run in from_lock:
        assert re.search(r"pip install --require-hashes --no-deps\b", run), run
    assert "grep -v '^deepspeed=='" in wheels and "--only-binary=:all:" in wheels
    assert "grep '^deepspeed=='" in deepspeed and "DS_BUILD_OPS=0" in deepspeed
    assert "--no-build-isolation" in deepspeed
    # Both before the project, which adds nothing of its own (--no-deps).
    (project,) = project_installs(stage)
    assert runs.index(deepspeed) < runs.index(project) and runs.index(wheels) < runs.index(deepspeed)
    assert (ROOT / LOCK).exists()


def test_the_dead_weight_wheels_are_out_of_the_lock():
    lock = (ROOT / LOCK).read_text()
    for name in ("nvidia-cuda-nvcc", "nvidia-cutlass-dsl-libs-cu12"):
        assert not re.search(rf"^{name}==", lock, re.M), f"{name} is in the lock"
    # nvcc comes from the base's apt repository, for the CUDA of the base (see the next test).
    apt = " ".join(r for r in stages_of(TRAINER)[-1].args("RUN") if "apt-get install" in r)
    major, minor = gpu_stack().cuda.split(".")
    for package in (f"cuda-nvcc-{major}-{minor}", f"cuda-cudart-dev-{major}-{minor}",
                    "build-essential", "libaio-dev", "libibverbs1", "librdmacm1"):
        assert package in apt.split(), f"the trainer's apt install lacks {package}"


def test_trainer_sets_the_cache_variables_of_the_stage_pods():
    from visionr1_operator.cluster import pods

    env = env_of(stages_of(TRAINER)[-1])
    for name, value in pods.cache_env().items():
        assert env.get(name) == value, f"{name}: the image says {env.get(name)!r}, stage pods {value!r}"


def test_trainer_cuda_base_matches_the_torch_that_vllm_pins():
    stack = gpu_stack()
    cuda = [s.image for s in stages_of(TRAINER) if s.image.startswith("nvidia/cuda:")]
    assert len(cuda) == 1, "the trainer must build on one nvidia/cuda base"
    tag = cuda[0].split(":")[1].split("@")[0]
    found = re.match(r"(\d+)\.(\d+)\.\d+-(?:cudnn-)?(devel|runtime|base)-ubuntu\d+\.\d+$", tag)
    assert found, f"unexpected nvidia/cuda tag {tag}"
    assert f"{found.group(1)}.{found.group(2)}" == stack.cuda, (
        f"nvidia/cuda:{tag} is CUDA {found.group(1)}.{found.group(2)}, but vllm=={vllm_pin()} "
        f"pins torch{stack.requires['torch']}, built for CUDA {stack.cuda}"
    )
    # The -base flavour: torch and vLLM load the CUDA libraries of their wheels; nvcc and the
    # headers the JIT builds need come from apt (the test above); -runtime and -devel carry
    # gigabytes of libraries the wheels bring again.
    assert found.group(3) == "base", "the trainer builds on a -base image (see the Dockerfile's header)"


def test_train_extra_and_constraints_admit_what_vllm_requires():
    stack = gpu_stack()
    train, pins = extra("train"), constraint_pins()
    problems = []
    for name, spec in stack.requires.items():
        wanted = SpecifierSet(spec)
        if name in train and not overlaps(train[name].specifier, wanted):
            problems.append(f"train extra {name}{train[name].specifier} vs vllm's {spec}")
        # torch's line is left out of the image's constraints (the CPU build for CI).
        if name != "torch" and name in pins and pins[name] not in wanted:
            problems.append(f"constraints.txt {name}=={pins[name]} vs vllm's {spec}")
    assert not problems, "; ".join(problems)


def overlaps(a: SpecifierSet, b: SpecifierSet) -> bool:
    """Whether two ranges share a version; tried on the versions they name (their bounds)."""
    both = a & b
    return any(both.contains(s.version, prereleases=True) for s in both)


def test_trainer_runs_as_the_uid_of_the_stage_pods_with_writable_home_and_caches():
    final = stages_of(TRAINER)[-1]
    uid, gid = final_user(final)
    assert uid.isdigit() and int(uid) != 0, f"USER {uid}: runAsNonRoot needs a numeric, non-zero uid"
    assert int(uid) == naming.RUN_AS_USER and int(gid or uid) == naming.RUN_AS_USER
    runs = " && ".join(final.args("RUN"))
    assert f"--uid {uid}" in runs, f"no passwd entry for uid {uid} (torch's getpass.getuser() needs one)"
    env = env_of(final)
    owned = [
        path
        for chown in re.findall(r"chown (?:-R )?" + uid + r"(?::\d+)? ([^&;]+)", runs)
        for path in chown.split()
    ]
    for var in ("HOME", "HF_HOME"):
        assert var in env, f"the trainer image sets no {var}"
        assert any(env[var] == p or env[var].startswith(p.rstrip("/") + "/") for p in owned), (
            f"{var}={env[var]} is not chown-ed to {uid}"
        )
    assert env.get("CUDA_HOME"), "JIT builds (FlashInfer, DeepSpeed) look for nvcc under CUDA_HOME"


def test_trainer_exposes_its_metrics_and_rendezvous_ports():
    exposed = {int(p.split("/")[0]) for a in stages_of(TRAINER)[-1].args("EXPOSE") for p in a.split()}
    metrics = StageContext.model_fields["metrics_port"].default
    assert metrics == 9400 and {metrics, naming.RENDEZVOUS_PORT} <= exposed


# --- the reader itself -------------------------------------------------------------------


def test_the_reader_joins_continued_lines_and_skips_comments():
    text = "# c\nFROM a:1.2.3 AS b\nRUN x \\\n  # inside\n  y \\\n\n  z\nUSER 1:1\n"
    assert parse_instructions(text) == [
        Instruction("FROM", "a:1.2.3 AS b", 2),
        Instruction("RUN", "x y z", 3),
        Instruction("USER", "1:1", 8),
    ]
    (stage,) = split_stages(parse_instructions(text))
    assert (stage.image, stage.name) == ("a:1.2.3", "b")
    with pytest.raises(ValueError, match="continued"):
        parse_instructions("RUN a \\\n")
    with pytest.raises(ValueError, match="stray backslash"):
        parse_instructions("RUN a \\\n# next\nUSER 1\n")
