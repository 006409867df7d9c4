"""Build the test control plane's binaries from the pinned Go modules, once per version.

Three binaries, each from its own module in this folder:

    k8s    etcd, kube-apiserver, kube-controller-manager, kube-scheduler (cmd/k8s)
    kwok   fake nodes and their pods (kwok/)
    kueue  Kueue's manager: quota, admission, preemption (kueue/; built on demand,
           only the tests that ask for Kueue need it)

They land in ``$VISIONR1_CLUSTER_CACHE`` (default ``~/.cache/visionr1/cluster``) under a
key made of everything that decides their bytes: the go.mod/go.sum files, the main
package, the Go version and the link flags. A warm cache costs nothing; a cold build
on 2 cores takes a while, so progress is printed as packages compile.

    python tests/cluster/gobuild.py          # build (or find) k8s and kwok, print their paths
    python tests/cluster/gobuild.py --kueue  # and Kueue
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
KUBERNETES_VERSION = "v1.35.4"
# /version reports these: without them it says v0.0.0 and version-gated clients
# (kubectl's skew warning, Kueue) misbehave.
LDFLAGS = " ".join([
    "-s", "-w",
    f"-X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION}",
    "-X k8s.io/component-base/version.gitMajor=1",
    "-X k8s.io/component-base/version.gitMinor=35",
    "-X k8s.io/component-base/version.gitTreeState=clean",
])


@dataclass(frozen=True)
class Target:
    name: str
    module_dir: Path
    package: str
    inputs: tuple[str, ...]  # files (relative to module_dir) that decide the binary


TARGETS = (
    Target("k8s", HERE, "./cmd/k8s", ("go.mod", "go.sum", "cmd/k8s/main.go")),
    Target("kwok", HERE / "kwok", "sigs.k8s.io/kwok/cmd/kwok", ("go.mod", "go.sum", "tools.go")),
)
# Kueue is not part of the plain control plane: `build_kueue()` builds it when asked.
KUEUE = Target("kueue", HERE / "kueue", "sigs.k8s.io/kueue/cmd/kueue", ("go.mod", "go.sum", "tools.go"))
KUEUE_MODULE = "sigs.k8s.io/kueue@v0.17.0"


class BuildError(RuntimeError):
    """Go is missing or a build failed; the message says which and where the log is."""


def cache_root() -> Path:
    default = Path.home() / ".cache" / "visionr1" / "cluster"
    return Path(os.environ.get("VISIONR1_CLUSTER_CACHE", default)).expanduser()


def go_binary() -> str:
    go = shutil.which("go")
    if go is None:
        raise BuildError("Go is not installed (the test control plane is built from Go modules)")
    return go


def _go_env() -> dict[str, str]:
    # The machine's own Go; never fetch a toolchain because a module asks for a newer one.
    return {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly -buildvcs=false"}


def cache_key(target: Target, go: str) -> str:
    digest = hashlib.sha256()
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    digest.update(version.encode())
    digest.update(LDFLAGS.encode())
    for name in target.inputs:
        digest.update(name.encode())
        digest.update((target.module_dir / name).read_bytes())
    return digest.hexdigest()[:16]


def binary_path(target: Target, go: str) -> Path:
    return cache_root() / f"{target.name}-{cache_key(target, go)}" / target.name


def build(target: Target, go: str, log=print) -> Path:
    """The cached binary for ``target``, building it first if this version has none."""
    out = binary_path(target, go)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    env = _go_env()
    total = _count_packages(target, go, env)
    log(f"[cluster build] {target.name}: compiling about {total} packages (cold builds take minutes)")
    started = time.monotonic()
    build_log = out.parent / "build.log"
    partial = out.with_suffix(".partial")
    cmd = [go, "build", "-v", "-trimpath", "-ldflags", LDFLAGS, "-o", str(partial), target.package]
    with build_log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=target.module_dir, env=env, stderr=subprocess.PIPE, text=True)
        compiled, shown = 0, 0.0
        for line in proc.stderr:  # `go build -v` names each package as it compiles it
            sink.write(line)
            compiled += 1
            if time.monotonic() - shown > 15:
                shown = time.monotonic()
                log(f"[cluster build] {target.name}: {compiled}/{total} packages, {shown - started:.0f} s")
        code = proc.wait()
    if code != 0:
        raise BuildError(f"go build of {target.name} failed (exit {code}); log: {build_log}")
    partial.rename(out)  # atomic: a killed build never leaves a half-written binary in place
    log(f"[cluster build] {target.name}: built in {time.monotonic() - started:.0f} s -> {out}")
    return out


def _count_packages(target: Target, go: str, env: dict[str, str]) -> int:
    listed = subprocess.run([go, "list", "-deps", target.package], cwd=target.module_dir, env=env,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        raise BuildError(f"go list for {target.name} failed: {listed.stderr.strip()[-2000:]}")
    return len(listed.stdout.split())


def module_dir(module: str, cwd: Path) -> Path:
    """Where the Go module cache holds a pinned module's source (kwok's CRDs and stages)."""
    go = go_binary()
    out = subprocess.run([go, "mod", "download", "-json", module], cwd=cwd, env=_go_env(),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise BuildError(f"go mod download {module} failed: {out.stderr.strip()}")
    return Path(json.loads(out.stdout)["Dir"])


def build_all(log=print, kueue: bool = False) -> dict[str, Path]:
    go = go_binary()
    targets = TARGETS + ((KUEUE,) if kueue else ())
    return {t.name: build(t, go, log) for t in targets}


def build_kueue(log=print) -> Path:
    return build(KUEUE, go_binary(), log)


if __name__ == "__main__":
    try:
        for name, path in build_all(kueue="--kueue" in sys.argv[1:]).items():
            print(f"{name}: {path}")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
